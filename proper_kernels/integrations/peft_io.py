"""PEFT LoRA directories in and out of a :class:`ProperModel`.

A PEFT LoRA directory is ``adapter_config.json`` + ``adapter_model.safetensors``
with keys ``base_model.model.<module path>.lora_A.weight`` [r, d_in] and
``...lora_B.weight`` [d_out, r]; the update is ``s B A x`` with s = lora_alpha / r
(lora_alpha / sqrt(r) with use_rslora).

Import (:func:`load_peft_adapter`): as the population LoRA (before it is merged) or
as one user's adapter (A_u, B_u). A population LoRA's rank must be population_rank and
its scale becomes the population scale. A user adapter of rank r <= user_rank is
zero-padded to the bank's rank and its scale s is folded into B (B_u = B s / s_u in
fp64, rounded once), so s_u B_u A_u x = s B A x: users of different ranks and alphas
share one bank (``UserBank.fit_rows``). The user's LoRA-aware router row V_u is reset
to zero (the adapter has none); its user embedding e_u is kept. Layers that the PEFT
adapter does not touch get B = 0 (no update). Loading switches the loaded part on for
forward and generate, whatever the stage (``ProperModel.loaded_adapters``). DoRA,
per-module rank/alpha patterns, fan_in_fan_out and trained biases are refused.

Serving (:func:`peft_user_dirs`, :func:`peft_bank_shape`, used by
``ProperModel.from_peft_users``): a set of plain PEFT adapters, one per user, becomes a
bank whose targets are the union of the adapters' target modules and whose rank is
their largest rank, each adapter's scale folded into its B as above.

Export (:func:`export_peft_user`): one user's LoRA as a PEFT directory that plain
``peft.PeftModel.from_pretrained(base, dir)`` loads. Only the user LoRA (plus,
by default, the population LoRA, concatenated in rank so the adapter applies to the
original base model) can be carried: the group experts are mixed by gates that
depend on each token (W_r x_t + V_u A_u x_t) and a LoRA has no such gate, so the
experts, the routers and the user embedding are *not* exported. The PEFT model
therefore reproduces the ProperModel output with the experts switched off
(``use_experts = False`` on every layer), not the full PROPER output.

This module imports nothing from the package: the model's methods it needs
(``adapted_layers``, ``user_bank``, ``_adapters_loaded``) are reached through ``pm``.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = ["load_peft_adapter", "export_peft_user", "read_peft_dir", "peft_user_dirs", "peft_bank_shape",
           "check_peft_shapes", "import_peft_user"]

Name = Union[str, int]
PeftDir = Tuple[dict, Dict[str, Tuple[Tensor, Tensor]]]  # what read_peft_dir returns

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def read_peft_dir(peft_dir: str):
    """(adapter_config dict, {module path: (A [r, d_in], B [d_out, r])})."""
    cpath = os.path.join(peft_dir, "adapter_config.json")
    if not os.path.isfile(cpath):
        raise FileNotFoundError(f"{peft_dir} is not a PEFT adapter directory (no adapter_config.json)")
    with open(cpath) as f:
        cfg = json.load(f)
    wpath = os.path.join(peft_dir, "adapter_model.safetensors")
    if os.path.isfile(wpath):
        from safetensors.torch import load_file

        sd = load_file(wpath)
    elif os.path.isfile(os.path.join(peft_dir, "adapter_model.bin")):
        sd = torch.load(os.path.join(peft_dir, "adapter_model.bin"), map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{peft_dir}: no adapter_model.safetensors / adapter_model.bin")
    pairs: Dict[str, Dict[str, Tensor]] = {}
    for k, v in sd.items():
        m = _KEY.match(k)
        if m is None:
            raise ValueError(f"{peft_dir}: tensor {k!r} is not a LoRA A/B weight (only plain LoRA adapters "
                             "can be imported: no biases, embeddings or modules_to_save)")
        pairs.setdefault(m["module"], {})[m["ab"]] = v
    out = {}
    for mod, d in pairs.items():
        if set(d) != {"A", "B"}:
            raise ValueError(f"{peft_dir}: module {mod!r} lacks lora_{'A' if 'A' not in d else 'B'}")
        out[mod] = (d["A"], d["B"])
    return cfg, out


def _peft_scale(cfg: dict) -> float:
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"only LoRA adapters can be imported, got peft_type={cfg.get('peft_type')!r}")
    for flag in ("use_dora", "fan_in_fan_out", "lora_bias"):
        if cfg.get(flag):
            raise ValueError(f"PEFT adapters with {flag}=True cannot be imported")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"PEFT adapters with bias={cfg['bias']!r} cannot be imported (bias='none' only)")
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    for pat in ("rank_pattern", "alpha_pattern"):
        if cfg.get(pat):
            raise ValueError(f"PEFT adapters with a per-module {pat} cannot be imported")
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def check_peft_shapes(layers: Mapping[str, nn.Module], pairs: Dict[str, Tuple[Tensor, Tensor]], r: int,
                      source: str, what: str) -> None:
    """Raise ValueError, naming ``source``, when ``pairs`` (of rank ``r``) touch a
    module that is not in ``layers`` (``what`` says which modules those are: "that
    ...") or do not fit its in_features -> out_features."""
    unknown = sorted(set(pairs) - set(layers))
    if unknown:
        more = " ..." if len(unknown) > 3 else ""
        raise ValueError(f"{source}: the PEFT adapter touches modules {unknown[:3]}{more} {what}")
    for name, (A, B) in pairs.items():
        layer = layers[name]
        if tuple(A.shape) != (r, layer.in_features) or tuple(B.shape) != (layer.out_features, r):
            raise ValueError(f"{source}: {name}: PEFT shapes A{list(A.shape)} B{list(B.shape)} do not fit a "
                             f"{layer.in_features}->{layer.out_features} linear at rank {r}")


def _not_adapted(pm: nn.Module) -> str:
    return f"that this ProperModel does not adapt (targets: {list(pm.proper_config.target_modules)})"


@torch.no_grad()
def import_peft_user(pm: nn.Module, cfg: dict, pairs: Dict[str, Tuple[Tensor, Tensor]], user: int,
                     source: str) -> None:
    """Write one PEFT LoRA (``read_peft_dir``'s output) as user ``user``'s A_u, B_u
    (zero-padded to the bank's rank, its scale folded into B_u), V_u = 0, and switch
    the user LoRA on. Everything is checked before the first write."""
    s_peft = _peft_scale(cfg)
    r = int(cfg["r"])
    layers = dict(pm.adapted_layers())
    check_peft_shapes(layers, pairs, r, source, _not_adapted(pm))
    uid = pm.user_bank.index([user]).item()
    rows = {}  # the user's new rows at the adapter's rank; a layer the adapter does not touch gets B_u = 0
    for name, layer in layers.items():
        A, B = pairs.get(name, (None, None))
        if A is None:
            rows[f"{name}.user_B"] = torch.zeros(1, layer.out_features, r)
        else:
            rows[f"{name}.user_A"] = A[None]
            rows[f"{name}.user_B"] = B[None]
        if layer.user_router is not None:  # V_u pairs with A_u: a new A_u starts with V_u = 0
            rows[f"{name}.user_router"] = torch.zeros(1, layer.num_experts, r)
    bank = pm.user_bank
    bank.set_state(bank.fit_rows(rows, r, s_peft, source), [uid], partial=True)
    pm._adapters_loaded("user")


@torch.no_grad()
def load_peft_adapter(pm: nn.Module, peft_dir: str, *, user: Optional[int] = None) -> None:
    """Import a PEFT LoRA as the population LoRA (``user=None``) or as user ``user``'s
    adapter, and switch that part on for forward and generate (in every stage;
    nothing more trains).

    Raises ValueError when a population LoRA's rank is not population_rank, when a
    user adapter's rank exceeds user_rank (smaller ranks are zero-padded), or when the
    adapter touches a module that is not adapted here; RuntimeError when the
    population LoRA was already merged."""
    cfg, pairs = read_peft_dir(peft_dir)
    if user is not None:
        import_peft_user(pm, cfg, pairs, user, str(peft_dir))
        return
    s_peft = _peft_scale(cfg)
    r = int(cfg["r"])
    layers = dict(pm.adapted_layers())
    pc = pm.proper_config
    if pm.population_merged:
        raise RuntimeError("the population LoRA is already merged: import a PEFT population LoRA before "
                           "the group stage")
    if r != pc.population_rank:
        raise ValueError(f"PEFT adapter rank {r} != population_rank {pc.population_rank}: build the "
                         f"ProperModel with ProperConfig(population_rank={r})")
    check_peft_shapes(layers, pairs, r, str(peft_dir), _not_adapted(pm))
    for name, layer in layers.items():
        A, B = pairs.get(name, (None, None))
        layer.population_scale = s_peft  # every layer: the untouched ones may train on
        if A is None:
            layer.population_B.zero_()
            continue
        layer.population_A.copy_(A)
        layer.population_B.copy_(B)
    pc.population_alpha = s_peft * r  # so a save/load rebuilds the same scale
    pm._adapters_loaded("population")


def peft_user_dirs(adapters: Union[str, "os.PathLike", Mapping[Name, str]]) -> Dict[Name, str]:
    """``{user name: PEFT directory}``, in row order, of ``adapters``: a mapping
    ``{name: directory}`` (its order), or a parent directory whose subdirectories
    holding an ``adapter_config.json`` are the users, named by the subdirectory,
    sorted by name. Names are str or int."""
    if isinstance(adapters, (str, os.PathLike)):
        parent = os.fspath(adapters)
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"adapters: {parent} is not a directory")
        if os.path.isfile(os.path.join(parent, "adapter_config.json")):
            raise ValueError(f"adapters: {parent} is one PEFT adapter, not a directory of them: pass its parent "
                             f"directory or a mapping {{user name: adapter directory}}")
        dirs = {d: os.path.join(parent, d) for d in sorted(os.listdir(parent))
                if os.path.isfile(os.path.join(parent, d, "adapter_config.json"))}
        if not dirs:
            raise FileNotFoundError(f"adapters: no subdirectory of {parent} holds an adapter_config.json")
        return dirs
    if not isinstance(adapters, Mapping):
        raise TypeError(f"adapters must be a mapping {{user name: PEFT directory}} or a parent directory, "
                        f"got {type(adapters).__name__}")
    if not adapters:
        raise ValueError("adapters is empty: give at least one {user name: PEFT directory}")
    for name in adapters:
        if isinstance(name, bool) or not isinstance(name, (str, int)):
            raise TypeError(f"user names must be str or int, got {type(name).__name__}: {name!r}")
    return {name: os.fspath(d) for name, d in adapters.items()}


def peft_bank_shape(adapters: Mapping[Name, PeftDir]) -> Tuple[Tuple[str, ...], int]:
    """(target module names, rank) of a bank that holds every adapter of
    ``adapters`` (``{name: read_peft_dir(...)}``): the union of the leaf names of
    their adapter_config.json ``target_modules`` (for a regex ``target_modules``, of
    the modules its weights touch), sorted, and their largest rank. Refuses what
    cannot be imported."""
    targets, rank = set(), 0
    for name, (cfg, pairs) in adapters.items():
        try:
            _peft_scale(cfg)
        except ValueError as e:
            raise ValueError(f"user {name!r}: {e}") from None
        rank = max(rank, int(cfg["r"]))
        listed = cfg.get("target_modules")
        if isinstance(listed, (list, tuple)):
            targets.update(t.rsplit(".", 1)[-1] for t in listed)
        targets.update(m.rsplit(".", 1)[-1] for m in pairs)
    return tuple(sorted(targets)), rank


@torch.no_grad()
def export_peft_user(pm: nn.Module, save_directory: str, user: int, *, include_population: bool = True) -> None:
    """Write user ``user``'s LoRA (A_u, B_u of every adapted layer) as a PEFT LoRA dir.

    The gates of the group experts depend on the token, which a LoRA cannot express,
    so the experts, both routers and e_u are left out: ``PeftModel`` on the result
    reproduces the ProperModel output *with the experts switched off*.

    include_population: also carry the population LoRA (merged or not), concatenated
        in rank (r = r_p + r_u, lora_alpha = r, B = [s_p B_p | s_u B_u]), so the
        adapter applies to the original base model. Without it (or when there is no
        population LoRA) the adapter is exactly (A_u, B_u) with r = user_rank,
        lora_alpha = user_alpha, and applies to the base with the population merged.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    pc = pm.proper_config
    if not (pc.num_users and pc.user_rank):
        raise ValueError("this ProperModel has no user adapters")
    rows = pm.user_bank.get_state([user])
    tensors = {}
    r_out, alpha_out = pc.user_rank, pc.user_alpha
    for name, layer in pm.adapted_layers():
        # On the CPU: the kept factors of a merged population LoRA stay where the merge
        # ran, which need not be where the model is now.
        A, B = rows[f"{name}.user_A"][0].cpu(), rows[f"{name}.user_B"][0].cpu()
        pop = None
        if include_population:
            if name in pm._merged_population:
                pop = pm._merged_population[name]
            elif layer.population_A is not None:
                pop = (layer.population_A.detach(), layer.population_B.detach())
        if pop is not None:
            Ap, Bp = pop
            A = torch.cat([Ap.to("cpu", A.dtype), A], 0)
            B = torch.cat([(layer.population_scale * Bp.cpu().double()).to(B.dtype),
                           (layer.user_scale * B.double()).to(B.dtype)], 1)
            r_out = A.shape[0]
            alpha_out = float(r_out)  # scale 1: the scales are folded into B
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.cpu().contiguous()
    os.makedirs(save_directory, exist_ok=True)
    name_or_path = getattr(getattr(pm.model, "config", None), "_name_or_path", None) or None
    lcfg = LoraConfig(r=r_out, lora_alpha=alpha_out, target_modules=list(pm.layer_names), lora_dropout=0.0,
                      bias="none", task_type="CAUSAL_LM", base_model_name_or_path=name_or_path)
    lcfg.save_pretrained(save_directory)
    save_file(tensors, os.path.join(save_directory, "adapter_model.safetensors"), metadata={"format": "pt"})

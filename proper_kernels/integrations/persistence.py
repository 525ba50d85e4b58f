"""Saving and loading a :class:`ProperModel`'s adapters, and the state_dict of a
model with tied weights.

A ProperModel directory holds ``proper_config.json`` (format, config, stage, layers,
which users, frozen users, loaded adapters, user names) and
``proper_adapter.safetensors`` (adapter tensors keyed ``<layer path>.<param>``; never
the base weights). A full save holds every adapter tensor plus the factors of a merged
population LoRA (``<layer>.merged_population_A/B``, merged again on load); a
user-subset save holds only those users' rows.

The file is written a block at a time (:mod:`.bank_io`; a paged bank streams its host
chunks, never a second copy of the bank) and read through a copy-on-write map whose
every offset is checked first: a corrupt or truncated file raises a ValueError naming
it. ``from_pretrained(..., user_bank="paged", user_cache_size=C, mmap=True)`` serves a
bank larger than host memory straight from the file.

Loading user adapters (:meth:`PersistenceMixin.load_users`, a PEFT import, or
:meth:`PersistenceMixin.from_peft_users`) switches the user LoRA on for forward and
generate in every stage, without unfreezing anything (``loaded_adapters``, kept by a
full save).

PEFT LoRA directories go in and out through :mod:`.peft_io`.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Mapping, Optional, Tuple, Type, TypeVar, Union

import torch
from torch import Tensor, nn

from . import distributed, peft_io
from .bank_io import SafetensorsFile, write_safetensors
from .config import ProperConfig
from .stages import SHARED_PARAMS
from .user_bank import UserIds, UserName

__all__ = ["PersistenceMixin", "CONFIG_NAME", "WEIGHTS_NAME", "FORMAT", "register_tied_weight_hooks"]

CONFIG_NAME = "proper_config.json"
WEIGHTS_NAME = "proper_adapter.safetensors"
FORMAT = "proper-kernels/1"


# ---------------------------------------------------------------------- tied weights
# state_dict() holds one entry per tied parameter (an lm_head tied to the input
# embedding: the first name, as HF saves it), so safetensors (and the HF Trainer's
# checkpoints of this non-PreTrainedModel) can save it; load_state_dict() fills the
# other names back in, so a strict load of it works.
def _tied_names(module: nn.Module) -> List[List[str]]:
    names: Dict[int, List[str]] = {}
    for n, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    return [ns for ns in names.values() if len(ns) > 1]


def _drop_tied_keys(module, state_dict, prefix, local_metadata) -> None:
    for names in _tied_names(module):
        for n in names[1:]:
            state_dict.pop(prefix + n, None)


def _fill_tied_keys(module, state_dict, prefix, *args) -> None:
    for names in _tied_names(module):
        have = [prefix + n for n in names if prefix + n in state_dict]
        for n in names:
            if have and prefix + n not in state_dict:
                state_dict[prefix + n] = state_dict[have[0]]


def register_tied_weight_hooks(module: nn.Module) -> None:
    """Make ``module.state_dict()`` keep one key per tied parameter and
    ``module.load_state_dict()`` fill the other keys back in."""
    # Older torch (our floor is 2.4) may have only the private names, which take the
    # same hooks.
    if hasattr(module, "register_state_dict_post_hook"):
        module.register_state_dict_post_hook(_drop_tied_keys)
    else:  # pragma: no cover - older torch
        module._register_state_dict_hook(_drop_tied_keys)
    if hasattr(module, "register_load_state_dict_pre_hook"):
        module.register_load_state_dict_pre_hook(_fill_tied_keys)
    else:  # pragma: no cover - older torch
        module._register_load_state_dict_pre_hook(_fill_tied_keys, with_module=True)


def open_proper_dir(directory: str) -> Tuple[dict, SafetensorsFile]:
    """(proper_config.json as a dict, the checked, mapped weights file) of a ProperModel
    directory. ValueError naming the file when either is corrupt or cut short."""
    cpath, wpath = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
    if not (os.path.isfile(cpath) and os.path.isfile(wpath)):
        raise FileNotFoundError(f"{directory} is not a ProperModel directory (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    with open(cpath) as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cpath}: corrupt JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else meta
        raise ValueError(f"{cpath}: unknown format {got!r} (expected {FORMAT!r})")
    return meta, SafetensorsFile(wpath)


def read_proper_dir(directory: str) -> Tuple[dict, Dict[str, Tensor]]:
    """(proper_config.json as a dict, the tensors, as copy-on-write views of the
    file's map) of a ProperModel directory."""
    meta, f = open_proper_dir(directory)
    return meta, {k: f.tensor(k) for k in f.keys()}


def _write_json(path: str, obj: dict) -> None:
    with open(f"{path}.tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(f"{path}.tmp", path)

_Model = TypeVar("_Model", bound="PersistenceMixin")


class PersistenceMixin:
    """save_pretrained / from_pretrained / load_users and the PEFT import/export of
    :class:`~proper_kernels.integrations.ProperModel`.

    Uses the model's ``proper_config``, ``stage``, ``stages_done``,
    ``population_merged``, ``_merged_population``, ``loaded_adapters``,
    ``layer_names``, ``adapted_layers()``, ``user_bank`` and the stage methods.
    """

    def _state_json(self, users: Optional[List[int]]) -> dict:
        names = self.user_bank.names
        if users is None:
            user_names = [[n, row] for n, row in names.items()]
        else:  # a subset: a name's row is its position among the saved users
            user_names = [[n, users.index(row)] for n, row in names.items() if row in users]
        return {
            "format": FORMAT,
            "config": self.proper_config.to_dict(),
            "stage": self.stage,
            "stages_done": list(self.stages_done),
            "population_merged": self.population_merged,
            "layers": list(self.layer_names),
            "users": users,
            # Per-user early stopping survives a full save: these are pinned again on load.
            "frozen_users": self.user_bank.frozen if users is None else [],
            "loaded_adapters": sorted(self.loaded_adapters),
            "user_names": user_names,
        }

    def adapter_state_dict(self) -> Dict[str, Tensor]:
        """Every adapter tensor: ``<layer>.<param>`` (the shared ones, then the user
        bank's) plus ``<layer>.merged_population_A/B`` (the factors of a merged
        population LoRA, re-merged on load). A paged bank's rows come from host
        memory (a view when the bank is one chunk, else a concatenated copy)."""
        out = self._shared_adapter_tensors()
        for key, _, _, blocks in self.user_bank.save_entries():
            blocks = list(blocks)
            out[key] = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
        return out

    def _shared_adapter_tensors(self) -> Dict[str, Tensor]:
        """The adapter tensors that are not user rows (and the merged population factors)."""
        out = {}
        for name, layer in self.adapted_layers():
            for pname in SHARED_PARAMS:
                p = getattr(layer, pname)
                if p is not None:
                    out[f"{name}.{pname}"] = p.detach()
            if name in self._merged_population:
                A, B = self._merged_population[name]
                out[f"{name}.merged_population_A"] = A
                out[f"{name}.merged_population_B"] = B
        return out

    def save_pretrained(self, save_directory: str, users: Optional[UserIds] = None) -> None:
        """Write ``proper_config.json`` + ``proper_adapter.safetensors`` (adapters only,
        never the base weights).

        ``users=None``: everything (shared parts and the whole bank), reloaded
        bit-exactly by :meth:`from_pretrained` on the same base model, which also pins
        the users frozen here (:meth:`freeze_users`) again, at their saved rows.
        ``users=[...]``: only those users' rows (e_u, A_u, B_u, V_u of every layer),
        nothing shared: for privacy and size; load it with :meth:`load_users`.
        Either keeps the names of the saved users (:attr:`user_rows`).

        The bank's rows are written a block at a time (a paged bank: after
        :meth:`sync_users`, its host chunks one by one), each file to a temporary
        name renamed at the end.
        """
        if users is None and distributed.saves_distributed(self):  # distributed hook: every rank calls it
            return distributed.save_pretrained(self, save_directory, (CONFIG_NAME, WEIGHTS_NAME, FORMAT))
        os.makedirs(save_directory, exist_ok=True)
        if users is None:
            ulist = None
            entries = [(k, v.dtype, tuple(v.shape), [v.detach()]) for k, v in self._shared_adapter_tensors().items()]
            entries += self.user_bank.save_entries()
        else:
            ulist = self.user_bank.index(users).tolist()
            entries = [(k, v.dtype, tuple(v.shape), [v]) for k, v in self.user_bank.get_state(ulist).items()]
        write_safetensors(os.path.join(save_directory, WEIGHTS_NAME), entries, metadata={"format": FORMAT})
        _write_json(os.path.join(save_directory, CONFIG_NAME), self._state_json(ulist))

    @classmethod
    def from_pretrained(cls: Type[_Model], base_model: nn.Module, directory: str, *, user_bank: Optional[str] = None,
                        user_cache_size: Optional[int] = None, mmap: bool = False, rank: Optional[int] = None,
                        world_size: Optional[int] = None) -> _Model:
        """Rebuild a ProperModel saved with ``save_pretrained(dir)`` on ``base_model``
        (the same, unmodified base the adapters were trained on). Bit-exact: the
        stage, the loaded adapters (on in every stage, as when saved), the frozen
        users and the user names come back too. A user-subset save raises: load it
        into a ProperModel with :meth:`load_users`.

        user_bank, user_cache_size: load into this bank mode (default: the saved
            config's), e.g. a resident save as ``user_bank="paged"``.
        mmap: paged bank only: keep the rows as a copy-on-write map of the file
            (read when a user first pages in; training never writes the file), for
            banks larger than host memory. Otherwise they are copied into host memory
            one tensor at a time, never a second copy of the bank.
        rank, world_size: load as rank ``rank`` of a user-sharded run of
            ``world_size`` ranks (only its users' rows; see :mod:`.distributed`). The
            save may be a full one or a sharded one of any world size; without them a
            sharded save loads every user."""
        meta, wfile = open_proper_dir(directory)
        if meta.get("users") is not None:
            raise ValueError(f"{directory} holds only users {meta['users']} (a user subset); load it into an "
                             f"existing ProperModel with load_users()")
        d = dict(meta["config"])
        d.update((k, v) for k, v in (("user_bank", user_bank), ("user_cache_size", user_cache_size)) if v is not None)
        cfg = ProperConfig.from_dict(d)
        if mmap and cfg.user_bank != "paged":
            raise ValueError("mmap=True maps a paged bank's host rows: pass user_bank='paged' (and user_cache_size)")
        paged = cfg.user_bank == "paged"
        # distributed hook: a sharded save, or rank `rank`'s users; None: one process, a full save
        shards = distributed.UserRowsSource.open(directory, meta, rank, world_size, mmap)
        pm = cls(base_model, shards.local_config(cfg) if shards else cfg,
                 bank_source=wfile if paged and not shards else None, bank_mmap=mmap)
        if shards:
            shards.adopt(pm)
        tensors = {k: wfile.tensor(k) for k in wfile.keys()}
        if list(pm.layer_names) != list(meta["layers"]):
            raise ValueError("the base model's targeted layers differ from the saved ones: "
                             f"{len(pm.layer_names)} vs {len(meta['layers'])} layers")
        with torch.no_grad():
            used = set()
            for name, layer in pm.adapted_layers():
                ka, kb = f"{name}.merged_population_A", f"{name}.merged_population_B"
                if ka in tensors:
                    layer.population_A.copy_(tensors[ka])
                    layer.population_B.copy_(tensors[kb])
                    used.update((ka, kb))
            if meta["population_merged"]:
                pm.merge_population()

            def saved(key: str, p: Tensor) -> Tensor:
                if key not in tensors:
                    raise ValueError(f"{directory}: missing tensor {key!r}")
                if tuple(tensors[key].shape) != tuple(p.shape):
                    raise ValueError(f"{key}: saved shape {list(tensors[key].shape)} != {list(p.shape)}")
                used.add(key)
                return tensors[key]

            for name, layer in pm.adapted_layers():
                for pname in SHARED_PARAMS:
                    p = getattr(layer, pname)
                    if p is not None:
                        p.copy_(saved(f"{name}.{pname}", p))
            if shards:
                pm.user_bank.set_state(shards.rows(pm, tensors, used), shards.ids)
            elif paged:  # the bank read its rows from the file (and checked them) when it was built
                used.update(pm.user_bank.row_specs())
            else:
                rows = {key: saved(key, p) for key, p in pm.user_bank.tensors()}
                if rows:
                    pm.user_bank.set_state(rows, list(range(pm.num_users)))
        extra = sorted(set(tensors) - used)
        if extra:
            raise ValueError(f"{directory}: unexpected tensors {extra[:4]}")
        pm.stages_done = list(meta["stages_done"])
        pm.stage = meta["stage"]
        pm.loaded_adapters = set(meta.get("loaded_adapters", []))  # a save without these fields has none
        pm._apply_stage_flags(pm.stage)
        pm.freeze_users(shards.frozen if shards else meta.get("frozen_users", []))
        pm.user_bank.set_names(dict(map(tuple, meta.get("user_names", []))))
        return pm

    def load_users(self, directory: str, at: Optional[UserIds] = None) -> List[int]:
        """Load a user subset saved with ``save_pretrained(dir, users=[...])`` into
        this bank at ids ``at`` (default: the saved ids), and switch the user LoRA on
        for forward and generate in every stage (nothing more trains; see
        ``loaded_adapters``). Grow the bank with :meth:`add_users` first when the ids
        do not exist yet.

        Users of a smaller rank are zero-padded to this bank's ``user_rank`` and a
        saved scale ``user_alpha / user_rank`` other than this bank's is folded into
        their B_u (``UserBank.fit_rows``); a larger rank raises. ``user_embed_dim``,
        ``user_router``, ``num_experts`` and the targets must be this model's. The
        saved users' names are kept. Returns the ids."""
        meta, tensors = read_proper_dir(directory)
        saved = meta.get("users")
        if saved is None:
            raise ValueError(f"{directory} is a full save, not a user subset: use ProperModel.from_pretrained")
        at = saved if at is None else (self.user_bank.index(at).tolist())
        if len(at) != len(saved):
            raise ValueError(f"{directory} holds {len(saved)} users but {len(at)} target ids were given")
        cfg = ProperConfig.from_dict(meta["config"])
        mine = self.proper_config
        for f in ("user_embed_dim", "user_router", "num_experts", "target_modules"):
            if getattr(cfg, f) != getattr(mine, f):
                raise ValueError(f"{directory}: {f}={getattr(cfg, f)!r} does not match this model's {getattr(mine, f)!r}")
        if (cfg.user_rank == 0) != (mine.user_rank == 0):  # rows with a LoRA and rows without one
            raise ValueError(f"{directory}: user_rank={cfg.user_rank} does not match this model's {mine.user_rank}")
        bank = self.user_bank
        if cfg.user_rank:
            tensors = bank.fit_rows(tensors, cfg.user_rank, cfg.user_alpha / cfg.user_rank, str(directory))
        bank.set_state(tensors, at)
        bank.set_names({n: at[i] for n, i in meta.get("user_names", [])})
        self._adapters_loaded("user")
        return list(at)

    # ------------------------------------------------------------------ PEFT
    def load_peft_adapter(self, peft_dir: str, *, user: Optional[int] = None) -> None:
        """Import a PEFT LoRA directory as the population LoRA (``user=None``; before
        merging; its rank must be ``population_rank``) or as user ``user``'s adapter
        (A_u, B_u: a rank below ``user_rank`` zero-padded, the PEFT scale folded into
        B_u; V_u reset to zero). The loaded part is then on for forward and generate
        in every stage (no set_stage needed; nothing more trains). See :mod:`.peft_io`."""
        peft_io.load_peft_adapter(self, peft_dir, user=user)

    @classmethod
    def from_peft_users(cls: Type[_Model], base_model: nn.Module,
                        adapters: Union[str, "os.PathLike", Mapping[UserName, str]], *,
                        backend: str = "auto") -> _Model:
        """Serve plain PEFT LoRA adapters, one per user, in mixed batches::

            pm = ProperModel.from_peft_users(model, {"alice": dir1, 7: dir2})
            pm.generate(ids, user_ids=[pm.user_rows["alice"], pm.user_rows[7], -1])

        ``adapters``: ``{user name: PEFT directory}`` (rows in its order) or a parent
        directory whose subdirectories with an ``adapter_config.json`` are the users
        (named by the subdirectory, rows in sorted order). :attr:`user_rows` maps each
        name to its row; ``user_ids=-1`` is the base model.

        The bank is sized by the adapters: targets = the union of their
        ``target_modules`` (from adapter_config.json), rank = their largest ``r``
        (smaller ranks are zero-padded, which adds exact zeros), no experts, no
        population LoRA. The bank's scale is 1 (``user_alpha = user_rank``) and each
        adapter's own lora_alpha / r (or / sqrt(r) with use_rslora) is folded into its
        B (in fp64, rounded once), so every row computes s B A x as PEFT does. The user
        LoRA is on at once: no stage call. ``base_model`` is modified in place, after
        every adapter was read and checked against it.
        """
        dirs = peft_io.peft_user_dirs(adapters)
        read = {name: peft_io.read_peft_dir(d) for name, d in dirs.items()}
        targets, rank = peft_io.peft_bank_shape(read)
        linears = {n: m for n, m in base_model.named_modules() if isinstance(m, nn.Linear)}
        for name, (acfg, pairs) in read.items():
            peft_io.check_peft_shapes(linears, pairs, int(acfg["r"]), f"user {name!r} ({dirs[name]})",
                                      f"that are not nn.Linear layers of the {type(base_model).__name__}")
        cfg = ProperConfig(target_modules=targets, num_experts=0, population_rank=0, num_users=len(read),
                           user_rank=rank, user_alpha=float(rank), user_embed_dim=0, user_router=False,
                           backend=backend)
        pm = cls(base_model, cfg)
        for row, (name, (acfg, pairs)) in enumerate(read.items()):
            peft_io.import_peft_user(pm, acfg, pairs, row, f"user {name!r} ({dirs[name]})")
        pm.user_bank.set_names({name: row for row, name in enumerate(read)})
        return pm

    def export_peft_user(self, save_directory: str, user: int, *, include_population: bool = True) -> None:
        """Write user ``user``'s LoRA as a PEFT LoRA directory. See :mod:`.peft_io`."""
        peft_io.export_peft_user(self, save_directory, user, include_population=include_population)

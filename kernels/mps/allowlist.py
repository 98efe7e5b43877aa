"""What MPS can run, checked on any machine: every aten op a torch op calls, against the installed
torch's own list of MPS kernels.

No machine this project is tested on has an Apple GPU, so "MPS-safe" is checked by reading, not by
running. Two files shipped with torch say what MPS has:

- ``torchgen/packaged/ATen/native/native_functions.yaml``, the declaration of every aten op: an op
  runs on MPS when its ``dispatch`` names an ``MPS`` kernel, or when it is composite (implemented
  once, for every device, with other ops or with none: views, ``copy_``, ``_to_copy``). An op with
  a ``structured_delegate`` has its delegate's kernels.
- ``torch/testing/_internal/common_mps.py``, torch's own MPS test exclusions: the ops (and dtypes)
  its ``UNIMPLEMENTED_XFAILLIST`` and ``SKIPLIST`` expect to fail on MPS. They are keyed by OpInfo
  name (``nn.functional.linear``, ``linalg.eig``), matched here to aten names by a rule of thumb
  (drop ``nn.functional.``, dots become underscores).

``scripts/mps_allowlist.py`` reads both into ``mps_allowlist.json`` (next to this module) with the
torch version and git hash it was made from. :class:`OpRecorder` records, under a
``TorchDispatchMode``, the aten op and dtypes of every call a block of code makes, and the
device-to-host reads; :func:`violations` lists what MPS would refuse: an op without an MPS kernel,
an excluded op and dtype, a dtype MPS never has (float64, complex128, the float8 types) or a matrix
product over integers (MPS has no integer GEMM). ``tests/test_mps_safety.py`` runs every public
op through it. What it cannot see: numerical differences, and ops MPS has but gets wrong.
"""
from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ALLOWLIST_FILE = Path(__file__).with_name("mps_allowlist.json")
NATIVE_FUNCTIONS = ("torchgen", "packaged", "ATen", "native", "native_functions.yaml")
COMMON_MPS = ("torch", "testing", "_internal", "common_mps.py")
# common_mps.py's lists of ops MPS does not implement (its other lists are about results that
# differ from the CPU's, or about gradients)
EXCLUSION_LISTS = ("UNIMPLEMENTED_XFAILLIST", "SKIPLIST")
COMPOSITE_KEYS = {"CompositeImplicitAutograd", "CompositeExplicitAutograd",
                  "CompositeExplicitAutogradNonFunctional"}
# common_mps.py marks every op as failing in double and cdouble; FP8 types have no Metal type
NEVER_ON_MPS = ("float64", "complex128", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2",
                "float8_e5m2fnuz", "float8_e8m0fnu")
MATRIX_PRODUCTS = {"mm", "bmm", "addmm", "addbmm", "baddbmm", "mv", "addmv", "dot", "vdot",
                   "matmul", "linear", "_addmm_activation"}
# aten ops that copy device data to the host (a synchronisation on a GPU): item(), bool(t), int(t)
# and .tolist() reach _local_scalar_dense; nonzero's output size depends on the data
READ_BACK_OPS = {"_local_scalar_dense", "nonzero"}


def torch_provenance() -> dict[str, str]:
    """The installed torch: version and the git commit it was built from."""
    return {"torch": torch.__version__, "git_version": torch.version.git_version}


def _site_file(parts: tuple[str, ...]) -> Path:
    """A file of an installed package (``torchgen`` / ``torch``), from the package's location."""
    import importlib.util

    spec = importlib.util.find_spec(parts[0])
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {parts[0]} is not installed")
    return Path(next(iter(spec.submodule_search_locations))).joinpath(*parts[1:])


def _mps_ops(native_functions: str) -> dict[str, str]:
    """``{"aten::name[.overload]": "mps" | "composite"}`` for every op that runs on MPS."""
    import yaml

    entries = yaml.load(native_functions, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    declared = {}
    for entry in entries:
        name = entry["func"].split("(", 1)[0]
        declared[name] = entry

    def support(name: str) -> str | None:
        entry = declared[name]
        if "structured_delegate" in entry:
            return support(entry["structured_delegate"])
        dispatch = entry.get("dispatch")
        if dispatch is None:
            return "composite"  # no dispatch section: CompositeImplicitAutograd
        keys = {key.strip() for keys in dispatch for key in keys.split(",")}
        if "MPS" in keys:
            return "mps"
        return "composite" if keys & COMPOSITE_KEYS else None

    return {f"aten::{name}": how for name in sorted(declared) if (how := support(name))}


def _exclusions(common_mps: str) -> dict[str, list[str] | None]:
    """``{aten base name: dtypes or None (all)}`` from common_mps.py's exclusion lists, read as
    Python source (the lists are only built on a Mac, inside a function)."""
    found: dict[str, list[str] | None] = {}
    for node in ast.walk(ast.parse(common_mps)):
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) else None)
        if not (isinstance(target, ast.Name) and target.id in EXCLUSION_LISTS):
            continue
        for key, value in zip(node.value.keys, node.value.values):
            name = key.value.removeprefix("nn.functional.").replace(".", "_")
            dtypes = None if isinstance(value, ast.Constant) else sorted(
                {element.attr for element in value.elts})
            found[name] = dtypes
    return dict(sorted(found.items()))


def build() -> dict[str, Any]:
    """The allowlist of the installed torch, with its provenance (what the script writes)."""
    native = _site_file(NATIVE_FUNCTIONS).read_text()
    common = _site_file(COMMON_MPS).read_text()
    digest = lambda text: hashlib.sha256(text.encode()).hexdigest()  # noqa: E731
    return {
        "provenance": {**torch_provenance(),
                       "made_by": "scripts/mps_allowlist.py",
                       "native_functions.yaml sha256": digest(native),
                       "common_mps.py sha256": digest(common)},
        "never_on_mps": list(NEVER_ON_MPS),
        "excluded": _exclusions(common),
        "ops": _mps_ops(native),
    }


def load(path: Path = ALLOWLIST_FILE) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def stale(allowlist: dict[str, Any]) -> str | None:
    """Why ``allowlist`` does not describe the installed torch (None when it does)."""
    made, here = allowlist["provenance"], torch_provenance()
    for key in here:
        if made.get(key) != here[key]:
            return (f"the MPS allowlist was made for torch {made.get('torch')} "
                    f"({made.get('git_version')}), this is torch {here['torch']} "
                    f"({here['git_version']}): run python scripts/mps_allowlist.py")
    return None


class OpRecorder(TorchDispatchMode):
    """Records ``(aten op, dtypes of its tensor arguments and results)`` of every call in a
    ``with`` block, in :attr:`calls`, and the calls that read device data back to the host in
    :attr:`read_backs`: :data:`READ_BACK_OPS`, and the Python-level ``Tensor.cpu``, ``numpy``,
    ``tolist``, ``item`` (on a CPU tensor ``.cpu()`` never reaches the dispatcher)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: set[tuple[str, tuple[str, ...]]] = set()
        self.read_backs: list[str] = []
        self._originals: dict[str, Any] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        schema = func._schema
        name = schema.name + (f".{schema.overload_name}" if schema.overload_name else "")
        tensors = [x for x in tree_flatten((args, kwargs, out))[0] if isinstance(x, torch.Tensor)]
        self.calls.add((name, tuple(sorted({str(t.dtype).removeprefix("torch.")
                                            for t in tensors}))))
        if name.removeprefix("aten::").split(".")[0] in READ_BACK_OPS:
            self.read_backs.append(name)
        return out

    def _counted(self, method: str):
        original = self._originals[method]

        def counted(tensor, *args, **kwargs):
            self.read_backs.append(f"Tensor.{method}")
            return original(tensor, *args, **kwargs)

        return counted

    def __enter__(self):
        for method in ("cpu", "numpy", "tolist", "item"):
            self._originals[method] = getattr(torch.Tensor, method)
            setattr(torch.Tensor, method, self._counted(method))
        return super().__enter__()

    def __exit__(self, *exc):
        for method, original in self._originals.items():
            setattr(torch.Tensor, method, original)
        return super().__exit__(*exc)


def violations(calls: set[tuple[str, tuple[str, ...]]], allowlist: dict[str, Any]) -> list[str]:
    """What MPS would refuse among ``calls`` (as :class:`OpRecorder` records them): one line
    each."""
    problems = []
    ops, excluded = allowlist["ops"], allowlist["excluded"]
    never = set(allowlist["never_on_mps"])
    for name, dtypes in sorted(calls):
        base = name.removeprefix("aten::").split(".")[0]
        where = f"{name} ({', '.join(dtypes) or 'no tensors'})"
        if name not in ops:
            problems.append(f"{where}: no MPS kernel in native_functions.yaml")
        if base in excluded and (excluded[base] is None or set(dtypes) & set(excluded[base])):
            problems.append(f"{where}: excluded by common_mps.py")
        if set(dtypes) & never:
            problems.append(f"{where}: MPS has no {', '.join(sorted(set(dtypes) & never))}")
        integer = [d for d in dtypes if d.startswith(("int", "uint")) or d == "bool"]
        if base in MATRIX_PRODUCTS and integer:
            problems.append(f"{where}: MPS has no integer matrix product")
    return problems

"""The documents hold what they claim: docs/ferrum_map.md lists every item of ferrum's KV cache API
(the one kvlab mirrors) and every row marked done names tests and notebooks that exist; the GPU
table in docs/perf.md is generated from the stored result, not retyped."""
import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FERRUM_ITEMS = ["NAME", "BYTES_PER_ELEM", "alloc_paged", "alloc_contig", "len", "set_len",
                "capacity", "block_size", "num_kv_heads", "head_dim", "block_table",
                "context_lens", "paged_block_indices", "paged_write", "paged_decode_attention",
                "contig_write", "contig_decode_attention", "is_paged", "KvScales", "AttnConfig",
                "qk_mode"]


def _rows():
    for line in (ROOT / "docs/ferrum_map.md").read_text().splitlines():
        if line.startswith("| `"):
            yield [cell.strip() for cell in line.strip("|").split("|")]


def test_every_ferrum_item_has_a_row():
    first_cells = " ".join(row[0] for row in _rows())
    for item in FERRUM_ITEMS:
        assert re.search(rf"`(\w+::)?{item}`", first_cells), item


def test_done_rows_name_existing_tests():
    rows = list(_rows())
    assert rows, "docs/ferrum_map.md has no table rows"
    for item, _kvlab, notebook, test, status in rows:
        if status.startswith("done"):
            for path in re.findall(r"tests/[\w/]+\.py", test):
                assert (ROOT / path).exists(), f"{item}: {path}"
            for nb in re.findall(r"\d\d_\w+", notebook):
                assert (ROOT / "notebooks" / f"{nb}.ipynb").exists(), f"{item}: {nb}"


def test_perf_gpu_table_is_the_stored_result():
    """docs/perf.md's GPU table is kvlab.bench.markdown_summary of data/bench/ (not retyped), and
    the README points there for the measured results."""
    from kvlab.bench import markdown_summary
    from kvlab.data import load_json

    perf = (ROOT / "docs/perf.md").read_text()
    assert markdown_summary(load_json("bench/h200_2026-11-27.json")) in perf
    assert "docs/perf.md" in (ROOT / "README.md").read_text()


STAGE_MODULES = {"paging": "paging", "RoPE": "rope", "quantization": "quant",
                 "attention": "attention", "fused write": "fused_write"}
BACKEND_PACKAGES = ("kvlab.ref", "kvlab.kernels.cuda", "kvlab.kernels.mps")


def _documented_ops():
    """(module, op, [parameter text], ref_only) for every signature docs/ops.md lists per stage."""
    sections = re.split(r"(?m)^## Stage \d — (.+?) \(", (ROOT / "docs/ops.md").read_text())
    for title, body in zip(sections[1::2], sections[2::2]):
        code = "\n".join(line for line in body.split("\n## ")[0].splitlines()
                         if line.startswith("    ") or re.match(r"\w+\(", line))
        for match in re.finditer(r"(?m)^\s*(\w+)\(([^)]*)\)\s*->(.*)$", code):
            params = [p.strip() for p in match[2].replace("\n", " ").split(",") if p.strip()]
            yield STAGE_MODULES[title], match[1], params, "ref only" in match[3]


def test_ops_doc_lists_the_stages():
    ops = list(_documented_ops())
    assert {module for module, *_ in ops} == set(STAGE_MODULES.values())
    assert len(ops) >= 20, ops


@pytest.mark.parametrize("package", BACKEND_PACKAGES)
def test_every_documented_op_has_its_signature_on_every_backend(package):
    """One signature per op (docs/ops.md): the same parameter names, order and defaults on each
    backend, so the parity suites can call any backend the same way."""
    for module, op, params, ref_only in _documented_ops():
        if ref_only and package != "kvlab.ref":
            continue
        func = getattr(importlib.import_module(f"{package}.{module}"), op, None)
        assert func is not None, f"{package}.{module} has no {op} (docs/ops.md lists it)"
        actual = [(p.name, p.default) for p in inspect.signature(func).parameters.values()]
        documented = [(p.split("=")[0], ast.literal_eval(p.split("=")[1]) if "=" in p
                       else inspect.Parameter.empty) for p in params]
        assert actual == documented, f"{package}.{module}.{op}: {actual} != docs/ops.md {params}"


def test_the_exercise_list_is_the_registry():
    """docs/exercises.md's table is kvlab.exercises.overview(): every exercise, none retyped."""
    from kvlab.exercises import EXERCISES, overview

    page = (ROOT / "docs/exercises.md").read_text()
    assert overview() in page
    assert all(f"`{name}`" in page for name in EXERCISES)
    readme = (ROOT / "README.md").read_text()
    assert "docs/exercises.md" in readme
    said = re.search(r"all\s+(\d+)\s+are listed in", readme)
    assert said and int(said.group(1)) == len(EXERCISES), "README's count of the exercises"

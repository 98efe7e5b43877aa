"""docs/seed_map.md lists every item of the seed engine's API (DESIGN.md §10), and every row marked
done names a test file that exists."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEED_ITEMS = ["NAME", "BYTES_PER_ELEM", "alloc_paged", "alloc_contig", "len", "set_len", "capacity",
              "block_size", "num_kv_heads", "head_dim", "block_table", "context_lens",
              "paged_block_indices", "paged_write", "paged_decode_attention", "contig_write",
              "contig_decode_attention", "is_paged", "KvScales", "AttnConfig", "qk_mode"]


def _rows():
    for line in (ROOT / "docs/seed_map.md").read_text().splitlines():
        if line.startswith("| `"):
            yield [cell.strip() for cell in line.strip("|").split("|")]


def test_every_seed_item_has_a_row():
    first_cells = " ".join(row[0] for row in _rows())
    for item in SEED_ITEMS:
        assert re.search(rf"`(\w+::)?{item}`", first_cells), item


def test_done_rows_name_existing_tests():
    for seed, _kvlab, notebook, test, status in _rows():
        if status.startswith("done"):
            for path in re.findall(r"tests/[\w/]+\.py", test):
                assert (ROOT / path).exists(), f"{seed}: {path}"
            for nb in re.findall(r"\d\d_\w+", notebook):
                assert (ROOT / "notebooks" / f"{nb}.ipynb").exists(), f"{seed}: {nb}"


def test_readme_gpu_table_is_the_stored_result():
    """The README's GPU table is kvlab.bench.markdown_summary of data/bench/ (not retyped)."""
    from kvlab.bench import markdown_summary
    from kvlab.data import load_json

    readme = (ROOT / "README.md").read_text()
    assert markdown_summary(load_json("bench/h200_2026-11-27.json")) in readme

"""The exercise of notebook 00 (the tour): what one token's K and V cost, from a real model's shape.

It is the course's first exercise, so it shows the whole loop on something small: a stub, a
checker that says what is wrong, a solution one call away. Its cases are real configs from
``data/models.json``, picked so that each usual slip gives a wrong number somewhere: the query
heads for the KV heads (GQA models), ``hidden_size / num_q_heads`` for ``head_dim`` (Qwen3 and
Gemma 3 set ``head_dim`` apart), one of K and V, one layer, int8 without its scales. When the
answer is wrong the checker lays out the product factor by factor and names the slip that gives
the learner's number, when one does.
"""
from __future__ import annotations

import numpy as np

from kvlab.dtypes import get_dtype
from kvlab.exercises.core import Case, Exercise, call, register
from kvlab.memory import bytes_per_token
from kvlab.shapes import get_model, list_models

NOTEBOOK = "00_tour"


def kv_bytes_per_token_solution(model, kv_dtype: str) -> int:
    """Bytes one token's K and V take in every layer. model: a :class:`kvlab.shapes.ModelShape`;
    kv_dtype: ``"fp16"`` (2 bytes an element) or ``"int8"`` (1 byte an element, plus one 2-byte
    fp16 scale per vector)."""
    if kv_dtype == "fp16":
        bytes_per_vector = model.head_dim * 2
    else:
        bytes_per_vector = model.head_dim * 1 + 2     # int8 codes, then their fp16 scale
    vectors = 2 * model.num_layers * model.num_kv_heads  # a K and a V vector per layer and KV head
    return vectors * bytes_per_vector


def kv_bytes_per_token_reference(model, kv_dtype: str) -> int:
    """:func:`kvlab.memory.bytes_per_token`."""
    return bytes_per_token(model, kv_dtype)


def _slips(model, kv_dtype: str) -> dict[str, int]:
    """What the usual slips give for this model: {what was done wrong: the number it gives}."""
    def total(heads=model.num_kv_heads, head_dim=model.head_dim, kv=2, layers=model.num_layers,
              scale=2, element=1 if kv_dtype == "int8" else 2):
        per_vector = head_dim * element + (scale if kv_dtype == "int8" else 0)
        return kv * layers * heads * per_vector

    return {
        "only one of K and V counted (every layer stores both)": total(kv=1),
        "num_q_heads used for the KV heads (GQA shares each KV head among a group of query "
        "heads)": total(heads=model.num_q_heads),
        "head_dim taken as hidden_size // num_q_heads (this config sets head_dim apart: read "
        "model.head_dim)": total(head_dim=model.hidden_size // model.num_q_heads),
        "one layer counted (each layer has its own K and V)": total(layers=1),
        "int8 without its fp16 scale (2 bytes per vector)": total(scale=0),
        "the scale counted as 4 bytes (it is fp16: 2)": total(scale=4),
        "int8 counted as 2 bytes an element": total(element=2),
        "elements counted, not bytes (fp16 is 2 bytes an element)": total(element=1),
        "kv_dtype left out: every cache taken as fp16": total(element=2, scale=0),
        "bits, not bytes": total() * 8,
    }


def _explain_kv_bytes(fn, case: Case) -> None:
    """The product factor by factor, and the slip (if one) that gives the learner's number."""
    model, kv_dtype = case.kwargs["model"], case.kwargs["kv_dtype"]
    try:
        got = call(fn, case)
    except Exception:
        return
    per_vector = get_dtype(kv_dtype).bytes_per_vector(model.head_dim)
    how = (f"{model.head_dim} dims x 2 B" if kv_dtype == "fp16"
           else f"{model.head_dim} dims x 1 B + a 2 B scale")
    print(f"  the product: 2 (K and V) x {model.num_layers} layers x {model.num_kv_heads} KV "
          f"heads x {per_vector} B a vector ({how}) = {bytes_per_token(model, kv_dtype):,} B")
    named = [slip for slip, value in _slips(model, kv_dtype).items()
             if value == got and value != bytes_per_token(model, kv_dtype)]
    if named:  # two slips can give one number: name them all
        print(f"  Your {got:,} is what you get with " + "; or with ".join(named) + ".")


def _kv_bytes_cases() -> list[Case]:
    def case(label, name, kv_dtype, random=False):
        return Case(label, dict(model=get_model(name), kv_dtype=kv_dtype), random=random)

    cases = [
        case("qwen3-8b in fp16 (the worked example above)", "qwen3-8b", "fp16"),
        case("llama-3.1-70b in int8: 64 query heads share 8 KV heads", "llama-3.1-70b", "int8"),
        case("qwen3-30b-a3b in fp16: head_dim 128, though hidden_size / num_q_heads is 64",
             "qwen3-30b-a3b", "fp16"),
        case("gemma-3-27b in int8: 16 KV heads, head_dim 128 (hidden_size / num_q_heads is 168)",
             "gemma-3-27b", "int8"),
        case("phi-3-mini-4k in int8: head_dim 96, a KV head for every query head",
             "phi-3-mini-4k", "int8"),
    ]
    rng = np.random.default_rng(0)
    names = sorted(list_models())
    for i in range(3):
        cases.append(case(f"random {i}", str(rng.choice(names)),
                          str(rng.choice(["fp16", "int8"])), random=True))
    return cases


register(Exercise(
    name="00.kv_bytes_per_token", notebook=NOTEBOOK, section="6 Check yourself",
    signature="kv_bytes_per_token(model, kv_dtype) -> int  # model: get_model(name); "
              "kv_dtype: 'fp16' or 'int8'",
    hint="2 (K and V) x model.num_layers x model.num_kv_heads x bytes a vector: head_dim x 2 in "
         "fp16; head_dim x 1 + 2 (its fp16 scale) in int8.",
    solution=kv_bytes_per_token_solution,
    reference=kv_bytes_per_token_reference,
    cases=_kv_bytes_cases,
    explain=_explain_kv_bytes,
))

"""Wrong answers the 02 (quantization) checkers must reject (gathered by tests/test_exercises.py),
the hand-picked cases checked against numbers worked out by hand, and the kernel puzzle's cases
(each catches the slip it was built for) and its picture of a failure."""
import re

import numpy as np

from kvlab.exercises import get
from kvlab.exercises.quant import THREADS, _scale_reference

from numba import cuda  # after kvlab.exercises, which picks GPU or simulator


def one_scale_per_tensor(x):
    """Takes amax over the whole tensor: small vectors lose every bit."""
    scale = np.maximum(np.abs(x).max(), np.float32(1e-8)) / np.float32(127)
    codes = np.rint(np.clip(x / scale, -127, 127)).astype(np.int8)
    return codes, np.full(x.shape[:2], scale, np.float16)


def rounds_half_away_from_zero(x):
    """Rounds 0.5 to 1 and 2.5 to 3 (school rounding), not half to even."""
    scale = np.maximum(np.abs(x).max(-1), np.float32(1e-8)) / np.float32(127)
    y = np.clip(x / scale[..., None], -127, 127)
    return np.trunc(y + np.copysign(0.5, y)).astype(np.int8), scale.astype(np.float16)


def codes_from_the_fp16_scale(x):
    """Divides by the stored fp16 scale: the codes the rule asks for come from the float32 one."""
    scale16 = (np.maximum(np.abs(x).max(-1), np.float32(1e-8)) / np.float32(127)).astype(np.float16)
    y = x / scale16.astype(np.float32)[..., None]
    return np.rint(np.clip(y, -127, 127)).astype(np.int8), scale16


def drops_the_floor(x):
    """scale = amax / 127 with no 1e-8 floor: a vector under the floor gets codes up to 127 (and an
    all-zero one divides 0 by 0); both store an fp16 scale of 0, so only the codes tell."""
    scale = np.abs(x).max(-1) / np.float32(127)
    with np.errstate(invalid="ignore", divide="ignore"):
        y = np.nan_to_num(x / scale[..., None])
    return np.rint(np.clip(y, -127, 127)).astype(np.int8), scale.astype(np.float16)


def keeps_float32_scales(x):
    """Returns the float32 scales: the cache stores them as fp16."""
    scale = np.maximum(np.abs(x).max(-1), np.float32(1e-8)) / np.float32(127)
    return np.rint(np.clip(x / scale[..., None], -127, 127)).astype(np.int8), scale


def dequantizes_in_fp16(codes, scales):
    """Multiplies in float16: the product is rounded to 11 bits."""
    return (codes.astype(np.float16) * scales[..., None]).astype(np.float32)


def forgets_to_broadcast(codes, scales):
    """code * scale without [..., None]: right only when there is one (token, head)."""
    return codes.astype(np.float32) * scales.astype(np.float32)


def _fp8(value, *, bias=7, largest=448.0, subnormals=True, saturate=True, rounding=round):
    """An E4M3 encoder with one rule changeable at a time."""
    sign = 0x80 if value < 0 else 0
    magnitude = min(abs(value), largest) if saturate else abs(value)
    lowest = 1 - bias
    if magnitude < 2.0 ** lowest and not subnormals:
        return sign
    exponent = lowest
    while magnitude >= 2.0 ** (exponent + 1):
        exponent += 1
    return (sign | ((exponent - lowest) * 8 + rounding(magnitude / 2.0 ** (exponent - 3)))) & 0xFF


def fp8_flushes_subnormals(value):
    """Sends everything below 2**-6 to zero."""
    return _fp8(value, subnormals=False)


def fp8_rounds_half_up(value):
    """Rounds a mantissa tie up (17 -> 18), not to even."""
    return _fp8(value, rounding=lambda q: int(np.floor(q + 0.5)))


def fp8_does_not_saturate(value):
    """Lets 1000 run past the largest exponent (the byte wraps)."""
    return _fp8(value, saturate=False)


def fp8_uses_the_fnuz_bias(value):
    """AMD's float8_e4m3fnuz: bias 8, largest 240."""
    return _fp8(value, bias=8, largest=240.0)


# --- 02.scale_kernel: plausible slips in a block reduction ---------------------------------------

@cuda.jit
def scale_from_max_not_abs(x, scales):
    """Reduces max x, not max |x|: a vector whose largest magnitude is negative gets too small a
    scale."""
    token, head, tid = cuda.blockIdx.x, cuda.blockIdx.y, cuda.threadIdx.x
    local = np.float32(0)
    for d in range(tid, x.shape[2], THREADS):
        local = max(local, x[token, head, d])
    partial = cuda.shared.array(THREADS, np.float32)
    partial[tid] = local
    cuda.syncthreads()
    width = THREADS // 2
    while width > 0:
        if tid < width:
            partial[tid] = max(partial[tid], partial[tid + width])
        cuda.syncthreads()
        width //= 2
    if tid == 0:
        scales[token, head] = max(partial[0], np.float32(1e-8)) / np.float32(127)


@cuda.jit
def scale_without_the_stride(x, scales):
    """Each thread reads only element threadIdx.x: elements THREADS.. are never looked at."""
    token, head, tid = cuda.blockIdx.x, cuda.blockIdx.y, cuda.threadIdx.x
    partial = cuda.shared.array(THREADS, np.float32)
    partial[tid] = abs(x[token, head, tid])
    cuda.syncthreads()
    width = THREADS // 2
    while width > 0:
        if tid < width:
            partial[tid] = max(partial[tid], partial[tid + width])
        cuda.syncthreads()
        width //= 2
    if tid == 0:
        scales[token, head] = max(partial[0], np.float32(1e-8)) / np.float32(127)


@cuda.jit
def scale_with_whole_turns_only(x, scales):
    """Loops head_dim // THREADS turns of THREADS elements: misses the tail when head_dim is not a
    multiple of THREADS."""
    token, head, tid = cuda.blockIdx.x, cuda.blockIdx.y, cuda.threadIdx.x
    local = np.float32(0)
    for turn in range(x.shape[2] // THREADS):
        local = max(local, abs(x[token, head, turn * THREADS + tid]))
    partial = cuda.shared.array(THREADS, np.float32)
    partial[tid] = local
    cuda.syncthreads()
    width = THREADS // 2
    while width > 0:
        if tid < width:
            partial[tid] = max(partial[tid], partial[tid + width])
        cuda.syncthreads()
        width //= 2
    if tid == 0:
        scales[token, head] = max(partial[0], np.float32(1e-8)) / np.float32(127)


@cuda.jit
def scale_tree_the_wrong_way(x, scales):
    """Runs the tree w = 1, 2, 4 with the halving tree's `tid < w`: partial[0] only ever takes in
    partials 1, 2 and 4."""
    token, head, tid = cuda.blockIdx.x, cuda.blockIdx.y, cuda.threadIdx.x
    local = np.float32(0)
    for d in range(tid, x.shape[2], THREADS):
        local = max(local, abs(x[token, head, d]))
    partial = cuda.shared.array(THREADS, np.float32)
    partial[tid] = local
    cuda.syncthreads()
    width = 1
    while width < THREADS:
        if tid < width:
            partial[tid] = max(partial[tid], partial[tid + width])
        cuda.syncthreads()
        width *= 2
    if tid == 0:
        scales[token, head] = max(partial[0], np.float32(1e-8)) / np.float32(127)


@cuda.jit
def scale_tree_stops_a_step_early(x, scales):
    """`while width > 1`: the last step (w = 1) never folds partial[1] into partial[0]."""
    token, head, tid = cuda.blockIdx.x, cuda.blockIdx.y, cuda.threadIdx.x
    local = np.float32(0)
    for d in range(tid, x.shape[2], THREADS):
        local = max(local, abs(x[token, head, d]))
    partial = cuda.shared.array(THREADS, np.float32)
    partial[tid] = local
    cuda.syncthreads()
    width = THREADS // 2
    while width > 1:
        if tid < width:
            partial[tid] = max(partial[tid], partial[tid + width])
        cuda.syncthreads()
        width //= 2
    if tid == 0:
        scales[token, head] = max(partial[0], np.float32(1e-8)) / np.float32(127)


@cuda.jit
def scale_from_thread_0_alone(x, scales):
    """Thread 0 stores the scale of its own partial: no shared memory, no reduction."""
    token, head, tid = cuda.blockIdx.x, cuda.blockIdx.y, cuda.threadIdx.x
    local = np.float32(0)
    for d in range(tid, x.shape[2], THREADS):
        local = max(local, abs(x[token, head, d]))
    if tid == 0:
        scales[token, head] = max(local, np.float32(1e-8)) / np.float32(127)


@cuda.jit
def scale_barrier_inside_the_if(x, scales):
    """The tree's barrier inside `if tid < width`: threads that skip a step skip its barrier too
    (undefined on a GPU; the simulator would run it to the right answer, the tracer refuses it)."""
    token, head, tid = cuda.blockIdx.x, cuda.blockIdx.y, cuda.threadIdx.x
    local = np.float32(0)
    for d in range(tid, x.shape[2], THREADS):
        local = max(local, abs(x[token, head, d]))
    partial = cuda.shared.array(THREADS, np.float32)
    partial[tid] = local
    cuda.syncthreads()
    width = THREADS // 2
    while width > 0:
        if tid < width:
            partial[tid] = max(partial[tid], partial[tid + width])
            cuda.syncthreads()
        width //= 2
    if tid == 0:
        scales[token, head] = max(partial[0], np.float32(1e-8)) / np.float32(127)


@cuda.jit
def scale_without_the_barrier_in_the_loop(x, scales):
    """The tree's steps with no barrier between them: a step reads slots the step before may not
    have written yet (the simulator often runs it to the right scale; the tracer refuses it)."""
    token, head, tid = cuda.blockIdx.x, cuda.blockIdx.y, cuda.threadIdx.x
    local = np.float32(0)
    for d in range(tid, x.shape[2], THREADS):
        local = max(local, abs(x[token, head, d]))
    partial = cuda.shared.array(THREADS, np.float32)
    partial[tid] = local
    cuda.syncthreads()
    width = THREADS // 2
    while width > 0:
        if tid < width:
            partial[tid] = max(partial[tid], partial[tid + width])
        width //= 2
    cuda.syncthreads()
    if tid == 0:
        scales[token, head] = max(partial[0], np.float32(1e-8)) / np.float32(127)


@cuda.jit
def scale_through_x_as_scratch(x, scales):
    """Leaves each partial in x (global memory) and lets the last thread read them with no
    barrier: right in the simulator's order, a race on a GPU (the tracer refuses it)."""
    token, head, tid = cuda.blockIdx.x, cuda.blockIdx.y, cuda.threadIdx.x
    local = np.float32(0)
    for d in range(tid, x.shape[2], THREADS):
        local = max(local, abs(x[token, head, d]))
    x[token, head, tid] = local
    if tid == THREADS - 1:
        amax = np.float32(0)
        for i in range(THREADS):
            amax = max(amax, x[token, head, i])
        scales[token, head] = max(amax, np.float32(1e-8)) / np.float32(127)


WRONG_ANSWERS = {
    "02.quantize_int8": [one_scale_per_tensor, rounds_half_away_from_zero,
                         codes_from_the_fp16_scale, keeps_float32_scales, drops_the_floor],
    "02.dequantize_int8": [dequantizes_in_fp16, forgets_to_broadcast],
    "02.fp8_e4m3_encode": [fp8_flushes_subnormals, fp8_rounds_half_up, fp8_does_not_saturate,
                           fp8_uses_the_fnuz_bias],
    "02.scale_kernel": [scale_from_max_not_abs, scale_from_thread_0_alone, scale_tree_the_wrong_way,
                        scale_tree_stops_a_step_early, scale_without_the_stride,
                        scale_with_whole_turns_only, scale_barrier_inside_the_if,
                        scale_without_the_barrier_in_the_loop, scale_through_x_as_scratch],
}


def test_the_notebook_examples_by_hand():
    ex = get("02.quantize_int8")
    codes, scales = ex.solution(np.array([[[0.9, -2.54, 0.01, 1.27, -0.635, 0.0, 2.54, 0.3175]]],
                                         np.float32))
    assert codes.tolist() == [[[45, -127, 0, 64, -32, 0, 127, 16]]]
    assert scales.dtype == np.float16 and scales[0, 0] == np.float16(0.02)
    ties, _ = ex.solution(np.array([[[127, 0.5, 1.5, 2.5, -2.5, -0.5]]], np.float32))
    assert ties.tolist() == [[[127, 0, 2, 2, -2, 0]]]
    assert ex.solution(np.array([[[3.0, 1.0, -1.5, 0.0]]], np.float32))[0][0, 0, 1] == 42


def test_fp8_bytes_by_hand():
    encode = get("02.fp8_e4m3_encode").solution
    by_hand = {1.0: 0x38, -2.0: 0xC0, 17.0: 0x58, 15.9: 0x58, 448.0: 0x7E, 1000.0: 0x7E,
               -465.0: 0xFE, 2.0 ** -6: 0x08, 2.0 ** -9: 0x01, 2.0 ** -10: 0x00, 0.0155: 0x08,
               0.0: 0x00}
    assert {v: encode(v) for v in by_hand} == by_hand


def test_every_fp8_code_round_trips_through_the_solution():
    from kvlab.ref.quant import fp8_e4m3_decode

    encode = get("02.fp8_e4m3_encode").solution
    for byte in range(256):
        if byte & 0x7F == 0x7F or byte == 0x80:  # NaN, and -0.0 (its sign: not asked for)
            continue
        assert encode(float(fp8_e4m3_decode(np.uint8(byte)))) == byte


# --- 02.scale_kernel: the cases, the slips they catch, and the picture of a failure -------------

def test_each_reduction_slip_fails_on_the_case_built_for_it(learner_view, capsys):
    """Each hand-picked case puts the largest |x| where one slip misses it, in an order where the
    earlier cases let that slip pass: the verdict names the idea that is wrong."""
    first_failure = {
        scale_from_max_not_abs: "the largest |x| is negative",
        scale_from_thread_0_alone: "the largest |x| at index 4",
        scale_tree_the_wrong_way: "the largest |x| at index 6",
        scale_tree_stops_a_step_early: "the largest |x| at index 1",
        scale_without_the_stride: "the largest |x| in the last element, index 15",
        scale_with_whole_turns_only: "head_dim 17, not a multiple of 8",
    }
    exercise = get("02.scale_kernel")
    exercise_without_picture = type(exercise)(**{**exercise.__dict__, "explain": None})
    for wrong, label in first_failure.items():
        assert exercise_without_picture.check(wrong) is False
        verdict = capsys.readouterr().out.splitlines()[0]
        assert label in verdict, (wrong.__name__, verdict)


def test_scale_cases_are_small_and_need_a_stride():
    cases = get("02.scale_kernel").cases()
    assert all(c.kwargs["x"].shape[2] > THREADS for c in cases)
    assert any(c.kwargs["x"].shape[2] % THREADS for c in cases if not c.random)
    assert sum(c.kwargs["x"].shape[0] * c.kwargs["x"].shape[1] for c in cases) <= 32  # blocks
    zero = next(c for c in cases if "all zeros" in c.label)
    assert get("02.scale_kernel").run(_scale_reference, zero)[0, 0] == 0  # the floor underflows


def test_a_failing_scale_kernel_is_drawn_and_its_tree_printed(monkeypatch, capsys):
    """The explanation cannot break silently: it draws the reads of x beside the solution's (the
    elements no thread read are gaps) and prints the solution's tree for the vector that differs."""
    import matplotlib.pyplot as plt

    from kvlab.exercises.quant import _launch_scale, _reads_by_own_block

    shown = []
    monkeypatch.setattr(plt, "show", lambda: shown.append(plt.gcf()))
    exercise = get("02.scale_kernel")
    case = next(c for c in exercise.cases() if "index 15" in c.label)
    exercise.explain(scale_without_the_stride, case)
    out = capsys.readouterr().out
    assert len(shown) == 1 and len(shown[0].axes) == 2
    assert [ax.get_title() for ax in shown[0].axes] == ["your kernel", "the solution"]
    assert "element 15, read by thread 7" in out and "after w = 1  [2.5]" in out
    owners, foreign = _reads_by_own_block(_launch_scale(scale_without_the_stride, case)[1])
    assert foreign == 0
    assert owners[0, 0].tolist() == list(range(THREADS)) + [-1] * THREADS  # the gaps
    reference, _ = _reads_by_own_block(_launch_scale(exercise.solution, case)[1])
    assert reference[0, 0].tolist() == [d % THREADS for d in range(16)]
    plt.close("all")


def test_a_scale_kernel_that_raises_still_gets_a_picture(learner_view, monkeypatch, capsys):
    import matplotlib.pyplot as plt

    @cuda.jit
    def reads_past_the_vector(x, scales):
        scales[cuda.blockIdx.x, cuda.blockIdx.y] = x[0, 0, x.shape[2] + cuda.threadIdx.x]

    shown = []
    monkeypatch.setattr(plt, "show", lambda: shown.append(plt.gcf()))
    assert get("02.scale_kernel").check(reads_past_the_vector) is False
    out = capsys.readouterr().out
    assert "your kernel raised IndexError" in out and "no picture" not in out
    assert len(shown) == 1 and "partials" not in out  # no tree: the kernel never finished
    plt.close("all")


def test_a_barrier_inside_the_if_is_named(learner_view, capsys):
    """The simulator gets the right scale from it; the checker still says what is wrong."""
    assert get("02.scale_kernel").check(scale_barrier_inside_the_if) is False
    out = capsys.readouterr().out
    assert "the tracer refuses your kernel (DivergentBarrierError)" in out
    assert "reached different barriers of " \
        "scale_barrier_inside_the_if" in out
    assert re.search(r"\(thread 0: line (\d+), line (\d+) x3; thread 1: line \1, line \2 x2; "
                     r"threads 2-3: line \1, line \2; threads 4-7: line \1\)", out), out


def test_a_missing_barrier_in_the_tree_is_named(learner_view, capsys):
    """Thread 0 reads partial[1] in the step where thread 1 writes it: a race on a GPU, whatever
    the simulator's order gave."""
    assert get("02.scale_kernel").check(scale_without_the_barrier_in_the_loop) is False
    out = capsys.readouterr().out
    assert "the tracer refuses your kernel (SharedMemoryRaceError): in block (0, 0, 0), thread 0 " \
        "read shared partial[1] at line " in out
    assert "and thread 1 wrote it at line " in out
    assert "(partial[tid] = max(partial[tid], partial[tid + width]))" in out
    assert "with no barrier between them (both had passed 1 barrier)" in out
    assert "so whether the read comes before or after is not defined" in out
    assert "Put a cuda.syncthreads() between them" in out


@cuda.jit
def scale_by_thread_0_alone(x, scales):
    """Right: thread 0 walks the whole vector while the others wait."""
    token, head = cuda.blockIdx.x, cuda.blockIdx.y
    if cuda.threadIdx.x == 0:
        amax = np.float32(0)
        for d in range(x.shape[2]):
            amax = max(amax, abs(x[token, head, d]))
        scales[token, head] = max(amax, np.float32(1e-8)) / np.float32(127)


@cuda.jit
def scale_read_whole_by_every_thread(x, scales):
    """Right: every thread reads the whole vector, so no reduction is needed."""
    token, head = cuda.blockIdx.x, cuda.blockIdx.y
    amax = np.float32(0)
    for d in range(x.shape[2]):
        amax = max(amax, abs(x[token, head, d]))
    if cuda.threadIdx.x == 0:
        scales[token, head] = max(amax, np.float32(1e-8)) / np.float32(127)


def test_a_right_kernel_that_wastes_work_passes_with_what_a_gpu_would_pay(learner_view, capsys):
    """GPU-Puzzles style: correct is not enough to be quiet. The first case's vector has 16
    elements and 8 threads: the solution's busiest thread makes 2 reads and thread 0 a write."""
    exercise = get("02.scale_kernel")
    assert exercise.check(scale_by_thread_0_alone) is True
    out = capsys.readouterr().out
    assert "Right, but slower on a GPU than it needs to be" in out
    assert "its busiest thread makes 17 reads and writes of the arrays where the solution's " \
        "makes 3" in out
    assert exercise.check(scale_read_whole_by_every_thread) is True
    assert "it reads and writes its arrays 129 times where the solution does 17" in \
        capsys.readouterr().out
    assert exercise.check(exercise.solution) is True
    assert "Right, but" not in capsys.readouterr().out


# --- 02.fake_quant_torch ---
import torch  # noqa: E402

_AXES = {"tensor": (0, 1, 2), "head": (0, 2), "token": (2,), "channel": (0,)}


def _fake_quant(x, granularity, *, axes=None, stored_fp16=True, floor=True, keepdim=True,
                rounding=torch.round, codes_from_stored=False, fp16_product=False):
    """The solution with one step changed (each wrong answer below changes one)."""
    amax = x.abs().amax(dim=axes or _AXES[granularity], keepdim=keepdim)
    scale = (amax.clamp(min=1e-8) if floor else amax) / 127
    stored = scale.half().float() if stored_fp16 else scale
    codes = rounding(x / (stored if codes_from_stored else scale)).clamp(-127, 127)
    if fp16_product:
        return (codes.half() * scale.half()).float()
    return codes * stored


def always_per_token(x, granularity):
    """The cache's own granularity whatever is asked."""
    return _fake_quant(x, granularity, axes=(2,))


def channel_over_the_dims(x, granularity):
    """'channel' read as 'over the channels' (dim 2): that is per token."""
    return _fake_quant(x, granularity, axes=(2,) if granularity == "channel" else None)


def reads_back_the_float32_scale(x, granularity):
    """Codes times the float32 scale: the cache keeps fp16 scales, so reads differ a little."""
    return _fake_quant(x, granularity, stored_fp16=False)


def fake_quant_without_the_floor(x, granularity):
    """amax / 127 with no floor: a cell of zeros divides 0 by 0."""
    return _fake_quant(x, granularity, floor=False)


def truncates_the_codes(x, granularity):
    """.to(torch.int8) on x / scale without rounding first: truncation toward zero."""
    return _fake_quant(x, granularity, rounding=torch.trunc)


def rounds_half_up(x, granularity):
    """floor(y + 0.5): a tie goes up, where torch.round (and np.rint) take the even code."""
    return _fake_quant(x, granularity, rounding=lambda y: torch.floor(y + 0.5))


def codes_from_the_fp16_scale(x, granularity):
    """Divides by the stored fp16 scale: a 1e-8 / 127 floor is 0 in fp16, so 0 / 0."""
    return _fake_quant(x, granularity, codes_from_stored=True)


def product_in_fp16(x, granularity):
    """codes.half() * scale.half(): the product rounded to fp16 before it is widened."""
    return _fake_quant(x, granularity, fp16_product=True)


WRONG_ANSWERS["02.fake_quant_torch"] = [always_per_token, channel_over_the_dims,
                                        reads_back_the_float32_scale,
                                        fake_quant_without_the_floor, truncates_the_codes,
                                        rounds_half_up, codes_from_the_fp16_scale,
                                        product_in_fp16]


def test_the_granularity_checker_names_the_axes_it_got(learner_view, capsys):
    get("02.fake_quant_torch").check(channel_over_the_dims)
    out = capsys.readouterr().out
    assert "fails on case 'per channel (KIVI's keys)" in out
    assert "per channel: amax over dims (0,) of [T, Hkv, D] = [6, 2, 8], one scale per cell: " \
        "scales of shape [1, 2, 8]" in out
    assert "Yours is what you get with per token's scales (amax over dims (2,))" in out
    get("02.fake_quant_torch").check(fake_quant_without_the_floor)
    assert "no 1e-8 floor: a cell of zeros gives 0 / 0 = NaN" in capsys.readouterr().out
    for wrong, slip in ((rounds_half_up, "round half up"),
                        (codes_from_the_fp16_scale, "codes divided by the fp16 scale"),
                        (product_in_fp16, "the product taken in fp16")):
        get("02.fake_quant_torch").check(wrong)
        assert f"Yours is what you get with {slip}" in capsys.readouterr().out
    get("02.fake_quant_torch").check(
        lambda x, granularity: _fake_quant(x, granularity, keepdim=False))
    assert "lost the dims it covers" in capsys.readouterr().out
    get("02.fake_quant_torch").check(lambda x, granularity: x.double())
    assert "  the result should be float32, got torch.float64" in \
        capsys.readouterr().out


@cuda.jit
def scale_by_shuffles(x, scales):
    """A warp-style reduction with shuffles: what a GPU kernel might do, but the simulator has
    no shuffles; the checker says so and what to use instead."""
    token, head, tid = cuda.blockIdx.x, cuda.blockIdx.y, cuda.threadIdx.x
    local = np.float32(0)
    for d in range(tid, x.shape[2], THREADS):
        local = max(local, abs(x[token, head, d]))
    width = THREADS // 2
    while width > 0:
        local = max(local, cuda.shfl_down_sync(0xFFFFFFFF, local, width))
        width //= 2
    if tid == 0:
        scales[token, head] = max(local, np.float32(1e-8)) / np.float32(127)


def test_a_warp_shuffle_is_told_to_be_a_gpu_only_operation(learner_view, capsys):
    assert get("02.scale_kernel").check(scale_by_shuffles) is False
    out = capsys.readouterr().out
    assert "The CUDA simulator that runs these puzzles has no cuda.shfl_down_sync: warp-level " \
        "operations (shuffles, syncwarp) run only on a GPU" in out


@cuda.jit
def scale_with_a_typo(x, scales):
    """The solution with one typo: cuda.syncthread, which no numba has."""
    token, head, tid = cuda.blockIdx.x, cuda.blockIdx.y, cuda.threadIdx.x
    partial = cuda.shared.array(THREADS, np.float32)
    partial[tid] = 0
    cuda.syncthread()
    if tid == 0:
        scales[token, head] = partial[0]


def test_a_misspelt_cuda_name_is_told_the_names_close_to_it(learner_view, capsys):
    assert get("02.scale_kernel").check(scale_with_a_typo) is False
    out = capsys.readouterr().out
    assert "numba.cuda has no syncthread: did you mean cuda.syncthreads" in out
    assert "warp-level" not in out

"""The fixed-shape decoding state and step that CUDA graphs replay: the same logits as DecodeState through a whole
search (reorders and finished sentences included), every fixed-shape step the same operations on the same shapes
with no host sync (what capture needs), and, where CUDA is present, captured graphs giving the eager outputs."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from translator import ModelConfig, build_model
from translator.config import DecodeConfig
from translator.cuda_graphs import GraphedStep, StaticDecodeState
from translator.decoding import beam_search, greedy, max_lengths
from translator.inference import translate_ids

PAD, BOS, EOS = 0, 1, 2


def models():
    torch.manual_seed(0)
    return {"encoder_decoder": build_model(ModelConfig.from_name("tiny", vocab_size=20, dropout=0.0)).eval(),
            "decoder_only": build_model(ModelConfig.from_name("lm_tiny", vocab_size=20)).eval(),
            "prefix_lm": build_model(ModelConfig.from_name("lm_tiny", vocab_size=20, prefix_lm=True)).eval()}


def start(model, n=5):
    """A fresh state, the tokens to start from and output limits: sources (or left-padded prompts) of unequal
    length, so that sentences finish at different steps and padding is masked."""
    src = torch.randint(4, 20, (n, 7), generator=torch.Generator().manual_seed(1))
    if model.cfg.arch == "encoder_decoder":
        src[1, 3:] = PAD
        src[3, 5:] = PAD
    else:
        src[1, :4] = PAD
        src[3, :2] = PAD
    src = src.to(next(model.parameters()).device)
    limit = max_lengths((src != PAD).sum(1), b=4)
    if model.cfg.arch == "encoder_decoder":
        return model.start(src), torch.full((n, 1), BOS, device=src.device), limit
    return model.start(src), src, limit


def record(model, search):
    """What `search(step, state, prefix, limit)` does to a DecodeState: ('step', tokens, logits) and
    ('reorder', index, (group, sentences)) in order."""
    calls = []
    state, prefix, limit = start(model)

    def step(tokens, state):
        logits = model.step(tokens, state)
        calls.append(("step", tokens.clone(), logits.clone()))
        return logits
    reorder = state.reorder

    def recorded_reorder(index, group=1, sentences=None):
        calls.append(("reorder", index.clone(), (group, sentences)))
        reorder(index, group, sentences)
    state.reorder = recorded_reorder
    search(step, state, prefix, limit)
    return calls


def static_state(model, width):
    state, prefix, limit = start(model)
    return StaticDecodeState(model, state, rows=prefix.size(0) * width, positions=prefix.size(1) + int(limit.max()))


SEARCHES = {"beam": (4, lambda step, state, prefix, limit: beam_search(step, state, prefix, limit, EOS, beam_size=4,
                                                                       banned=(PAD, BOS))),
            "greedy": (1, lambda step, state, prefix, limit: greedy(step, state, prefix, limit, EOS, banned=(PAD, BOS)))}


@pytest.mark.parametrize("told", [True, False])
@pytest.mark.parametrize("search", SEARCHES)
@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only", "prefix_lm"])
@torch.inference_mode()
def test_static_state_gives_the_logits_of_the_growing_one(arch, search, told):
    # told: reorders carry the search's word on which sentence each group comes from; else the state reads it
    # off the row index.
    model = models()[arch]
    width, run = SEARCHES[search]
    calls = record(model, run)
    assert sum(kind == "reorder" for kind, *_ in calls) >= 2  # finished sentences were dropped on the way
    state, step = static_state(model, width), GraphedStep(model, capture=False)
    for kind, a, b in calls:
        if kind == "step":
            torch.testing.assert_close(step(a, state), b, atol=1e-5, rtol=1e-5)
        else:
            state.reorder(a, b[0], b[1] if told else None)


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
        self.ops.append((str(func), shapes))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only"])
@torch.inference_mode()
def test_fixed_shape_steps_repeat_the_same_operations_without_host_syncs(arch):
    # A CUDA graph replays the operations of the step it captured, on the same shapes and addresses: every
    # fixed-shape step must make the same calls on the same shapes, and none that reads a value on the host.
    model = models()[arch]
    state, step = static_state(model, 4), GraphedStep(model, capture=False)
    traces = []
    fixed_step = step._step

    def traced(state):
        with RecordOps() as ops:
            logits = fixed_step(state)
        traces.append(ops.ops)
        return logits
    step._step = traced
    _, prefix, limit = start(model)
    beam_search(step, state, prefix, limit, EOS, beam_size=4, banned=(PAD, BOS))
    assert len(traces) >= 3
    assert all(trace == traces[0] for trace in traces)
    syncing = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
               "aten.item.default", "aten.is_nonzero.default"}
    assert not syncing & {name for name, _ in traces[0]}
    assert {shapes[0][0] for name, shapes in traces[0] if name == "aten.embedding.default"} == {20}  # all 5 x 4 rows


@pytest.mark.parametrize("arch", ["encoder_decoder", "prefix_lm"])
@torch.inference_mode()
def test_translate_ids_with_cuda_graphs_runs_the_static_path_with_the_same_outputs(arch):
    model = models()[arch]
    sources = [torch.randint(4, 20, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in range(1, 12)]
    for mode, beam in (("beam", 4), ("greedy", 1)):
        options = DecodeConfig(beam=beam, batch_tokens=40)
        graphs = DecodeConfig(beam=beam, batch_tokens=40, cuda_graphs=True)
        assert translate_ids(model, sources, graphs, mode=mode, nbest=1) == \
            translate_ids(model, sources, options, mode=mode, nbest=1)


def test_a_reorder_beyond_the_room_is_refused():
    model = models()["encoder_decoder"]
    state = static_state(model, 1)
    with torch.inference_mode():
        state.reorder(torch.arange(5))
        with pytest.raises(ValueError, match="exceeds the fixed room of 5"):
            state.reorder(torch.arange(5).repeat_interleave(2))


@torch.inference_mode()
def test_captured_graphs_give_the_eager_outputs_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    model = models()["encoder_decoder"].cuda()
    width, run = SEARCHES["beam"]
    state, prefix, limit = start(model)
    expected = run(model.step, state, prefix, limit)
    step = GraphedStep(model, capture=True)
    got = run(step, static_state(model, width), prefix, limit)
    assert step.graph is not None
    assert [[h.tokens for h in hs] for hs in got] == [[h.tokens for h in hs] for hs in expected]

"""Sampling filters and incremental detokenization with stop strings (no model needed)."""
from __future__ import annotations

import torch

from loramux.engine.detokenize import IncrementalText
from loramux.engine.request import SamplingParams
from loramux.engine.sampling import filter_logits, make_generator, sample_next


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    kept = lambda p: torch.isfinite(filter_logits(logits, p)).nonzero().flatten().tolist()  # noqa: E731
    assert kept(SamplingParams(temperature=1.0, top_k=2)) == [0, 1]
    probs = logits.softmax(-1)  # 0.636, 0.234, 0.086, ...
    assert kept(SamplingParams(temperature=1.0, top_p=0.5)) == [0]
    assert kept(SamplingParams(temperature=1.0, top_p=float(probs[0] + 0.01))) == [0, 1]
    assert kept(SamplingParams(temperature=1.0)) == [0, 1, 2, 3, 4]


def test_sample_next_greedy_rows_and_seeded_rows():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=7), SamplingParams(temperature=0)]
    gens = [None, make_generator(7, logits.device), None]
    out = sample_next(logits, params, gens)
    assert out[0] == int(logits[0].argmax()) and out[2] == int(logits[2].argmax())
    again = sample_next(logits[1:2], params[1:2], [make_generator(7, logits.device)])
    assert again == [out[1]]  # same seed, same draw, whatever else was in the batch


class WordTokenizer:
    """Token i is VOCAB[i]; 0 is a special token (skipped); 9 is half of a multi-byte character."""

    VOCAB = ["<eos>", "Hello", " wor", "ld", "\n", "\n", "END", " ", "x", "\ufffd"]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.VOCAB[i] for i in ids if i or not skip_special_tokens)


def _stream(tokens, stop=()):
    detok = IncrementalText(WordTokenizer(), stop)
    deltas = []
    for n in range(1, len(tokens) + 1):
        deltas.append(detok.update(tokens[:n]))
        if detok.stopped:
            return deltas, True
    deltas.append(detok.flush())
    return deltas, False


def test_text_deltas_add_up_and_special_tokens_vanish():
    deltas, stopped = _stream([1, 2, 3, 0])
    assert "".join(deltas) == "Hello world" and not stopped


def test_stop_string_spanning_tokens_is_cut_and_never_streamed():
    deltas, stopped = _stream([1, 4, 5, 6, 8], stop=["\n\nEND"])
    assert stopped and "".join(deltas) == "Hello"
    assert deltas[1] == deltas[2] == ""  # "\n" and "\n\n" were held back: they could start the stop string


def test_held_back_prefix_is_released_when_no_stop_follows():
    deltas, stopped = _stream([1, 4, 8], stop=["\n\nEND"])
    assert not stopped and deltas == ["Hello", "", "\nx", ""]


def test_incomplete_character_is_held_until_the_end():
    deltas, _ = _stream([1, 9, 8])
    assert deltas[1] == "" and "".join(deltas) == "Hello\ufffdx"

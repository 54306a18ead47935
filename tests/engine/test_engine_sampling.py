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


# ---------------------------------------------------------------- pick_tokens: constrained and sampled rows
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402

from loramux.engine import sampling  # noqa: E402
from loramux.engine.failures import RowFailed  # noqa: E402
from loramux.engine.sampling import pick_tokens  # noqa: E402

V = 300


class MaskConstraint:
    """A fixed sequence of masks, one per step; records what it accepted."""

    def __init__(self, masks) -> None:
        self.masks, self.step, self.accepted = masks, 0, []

    def allowed(self, vocab_size: int) -> torch.Tensor:
        return self.masks[self.step % len(self.masks)]

    def accept(self, token_id: int) -> None:
        assert bool(self.masks[self.step % len(self.masks)][token_id]), token_id
        self.accepted.append(token_id)
        self.step += 1

    def is_finished(self) -> bool:
        return False


def _masks(seed: int, density: float, steps: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        mask = torch.rand(V, generator=gen) < density
        mask[int(torch.randint(0, V, (1,), generator=gen))] = True  # never empty
        out.append(mask)
    return out


ROWS = [  # (params, mask density or None = free)
    (SamplingParams(temperature=0), 0.02),
    (SamplingParams(temperature=0), None),
    (SamplingParams(temperature=0, logit_bias={5: 30.0, 7: -2.5, 299: 8.0}), 0.5),
    (SamplingParams(temperature=0.8, top_p=0.9, seed=3), 0.03),
    (SamplingParams(temperature=1.3, top_k=5, seed=4), None),
    (SamplingParams(temperature=0.7, top_k=3, top_p=0.8, seed=5, logit_bias={11: 4.0}), 0.9),
    (SamplingParams(temperature=1.0, seed=6), 1.0),
    (SamplingParams(temperature=0, logit_bias={2: 1.0}), None),
]


def _seqs(rows):
    seqs = []
    for params, density in rows:
        constraint = None if density is None else MaskConstraint(_masks(100 + ROWS.index((params, density)), density))
        gen = None if params.greedy else make_generator(params.seed, torch.device("cpu"))
        seqs.append(SimpleNamespace(params=params, constraint=constraint, generator=gen))
    return seqs


def _decode(logit_steps, seqs):
    """pick_tokens over several steps, accepting each constrained row's token."""
    out = [[] for _ in seqs]
    for logits in logit_steps:
        for j, (seq, token) in enumerate(zip(seqs, pick_tokens(logits, seqs))):
            assert isinstance(token, int), token
            out[j].append(token)
            if seq.constraint is not None:
                seq.constraint.accept(token)
    return out


def _reference_greedy(row: torch.Tensor, params: SamplingParams, mask) -> int:
    """The engine API's order on a whole row in torch: bias, mask, argmax (its first maximum)."""
    row = row.clone()
    for t, b in params.logit_bias:
        row[t] += torch.tensor(b, dtype=row.dtype)
    if mask is not None:
        row = row.masked_fill(~mask, float("-inf"))
    return int(row.argmax())


def test_greedy_rows_equal_a_masked_argmax_over_the_whole_row():
    torch.manual_seed(0)
    steps = [torch.randn(len(ROWS), V) for _ in range(3)]
    steps[1][:, 40:44] = 9.0  # ties: the first maximum (lowest id) wins, as torch's argmax
    seqs = _seqs(ROWS)
    masks = [None if s.constraint is None else s.constraint.masks for s in seqs]
    got = _decode(steps, seqs)
    for j, (params, _) in enumerate(ROWS):
        if params.greedy:
            assert got[j] == [_reference_greedy(steps[k][j], params, None if masks[j] is None else masks[j][k])
                              for k in range(3)], j


def test_each_row_picks_what_it_picks_alone_whatever_shares_its_batch():
    """Free and constrained, greedy and seeded-sampled rows: the batch equals each row run alone, and
    the float64 torch path (other devices/dtypes) picks the same greedy tokens and only allowed ones."""
    torch.manual_seed(1)
    steps = [torch.randn(len(ROWS), V) for _ in range(3)]
    together = _decode(steps, _seqs(ROWS))
    for j in range(len(ROWS)):
        alone = _decode([s[j:j + 1] for s in steps], _seqs(ROWS[j:j + 1]))
        assert alone[0] == together[j], j
    reversed_rows = _decode([s.flip(0) for s in steps], _seqs(ROWS[::-1]))
    assert reversed_rows[::-1] == together
    torch_path = _decode([s.double() for s in steps], _seqs(ROWS))  # MaskConstraint.accept checks the mask
    assert [t for (p, _), t in zip(ROWS, torch_path) if p.greedy] == [t for (p, _), t in zip(ROWS, together) if p.greedy]


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.9), SamplingParams(temperature=1.5, top_k=7),
                                    SamplingParams(temperature=0.6, top_p=0.7),
                                    SamplingParams(temperature=1.0, top_k=20, top_p=0.95),
                                    SamplingParams(temperature=2.0, top_p=0.999)])
@pytest.mark.parametrize("spread", [3.0, 12.0])  # 12: most tokens under sampling.NUCLEUS_CUT (only the head sorted)
def test_numpy_filters_keep_what_filter_logits_keeps_with_the_same_probabilities(params, spread):
    torch.manual_seed(2)
    row = torch.randn(V) * spread
    reference = filter_logits(row, params).softmax(-1)  # (V,)
    p = sampling._probs(row.numpy().copy(), params)
    p = p / p.sum()
    assert ((p > 0) == (reference > 0).numpy()).all()
    assert abs(p - reference.double().numpy()).max() < 1e-6


def test_top_p_whose_nucleus_reaches_below_the_cut_sorts_everything():
    """One token at 10, the rest just under 0 (each under NUCLEUS_CUT of it, together ~1% of the mass, no
    ties): top_p 0.999 needs part of the tail (the full sort), top_p 0.9 only the head."""
    row = torch.linspace(-0.5, 0.0, V)
    row[17] = 10.0
    for top_p in (0.999, 0.9):
        params = SamplingParams(temperature=1.0, top_p=top_p)
        p = sampling._probs(row.numpy().copy(), params)
        reference = filter_logits(row, params).softmax(-1)
        assert ((p > 0) == (reference > 0).numpy()).all()
        assert int((p > 0).sum()) > 1 if top_p == 0.999 else int((p > 0).sum()) == 1
        assert abs(p / p.sum() - reference.double().numpy()).max() < 1e-6


def test_a_constrained_sampled_row_draws_only_allowed_tokens_with_the_masked_distribution():
    logits = torch.zeros(1, V)
    allowed = torch.zeros(V, dtype=torch.bool)
    allowed[[3, 50, 51, 200]] = True
    logits[0, [3, 50, 51, 200]] = torch.tensor([1.0, 0.0, 2.0, -1.0])
    logits[0, 7] = 50.0  # the free favourite, forbidden
    seq = SimpleNamespace(params=SamplingParams(temperature=1.0, seed=0), constraint=MaskConstraint([allowed]),
                          generator=make_generator(0, torch.device("cpu")))
    draws = [pick_tokens(logits, [seq])[0] for _ in range(4000)]
    assert set(draws) == {3, 50, 51, 200}
    expected = torch.tensor([1.0, 0.0, 2.0, -1.0]).softmax(-1).tolist()
    for token, prob in zip([3, 50, 51, 200], expected):
        assert abs(draws.count(token) / len(draws) - prob) < 0.03, (token, prob)


class _Broken:
    def __init__(self, mask) -> None:
        self.mask = mask

    def allowed(self, vocab_size: int):
        if isinstance(self.mask, Exception):
            raise self.mask
        return self.mask

    def accept(self, token_id: int) -> None:
        pass

    def is_finished(self) -> bool:
        return False


@pytest.mark.parametrize("mask,needle", [(torch.zeros(V, dtype=torch.bool), "allows no token"),
                                         (torch.ones(V + 1, dtype=torch.bool), "must return"),
                                         (torch.ones(V, dtype=torch.int64), "must return"),
                                         (RuntimeError("grammar error: boom"), "boom")])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_bad_constraint_fails_its_row_only(mask, needle, temperature):
    torch.manual_seed(3)
    logits = torch.randn(len(ROWS) + 1, V)
    good = _decode([logits[:-1]], _seqs(ROWS))
    seqs = _seqs(ROWS)
    seqs.append(SimpleNamespace(params=SamplingParams(temperature=temperature, seed=9), constraint=_Broken(mask),
                                generator=make_generator(9, torch.device("cpu"))))
    out = pick_tokens(logits, seqs)
    assert isinstance(out[-1], Exception) and needle in str(out[-1])
    if needle != "boom":
        assert isinstance(out[-1], RowFailed)
    assert [[t] for t in out[:-1]] == good

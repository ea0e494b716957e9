"""Q-SFT: the loss, Bellman targets, Polyak update and extraction by hand; a few steps on both tiny models."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtrl.algorithms.offline import pad_batch
from mtrl.algorithms.qsft import (
    QSFTConfig,
    QSFTLogitsProcessor,
    batch_loss,
    bellman_targets,
    build_features,
    combine_logprobs,
    monte_carlo_targets,
    polyak_update,
    qsft_loss,
    qsft_translate,
    rescale_rewards,
    resolve_return_range,
    token_logits,
    train_qsft,
)
from mtrl.errors import MtrlError


def logits_of(probs: list[list[list[float]]]) -> torch.Tensor:
    return torch.tensor(probs).log()


# ------------------------------------------------------------------ loss
def test_loss_by_hand_with_padding():
    # V = 4; row of three positions, the third is padding (its logits are garbage on purpose).
    logits = logits_of([[[0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25], [0.97, 0.01, 0.01, 0.01]]])
    targets = torch.tensor([[0, 2, 1]])
    weights = torch.tensor([[0.7, 0.2, 0.9]])
    mask = torch.tensor([[1, 1, 0]])
    # t0: -(0.7 ln .4 + 0.3/3 (ln .3 + ln .2 + ln .1)); t1: uniform, so -(0.2 + 0.8) ln .25
    t0 = -(0.7 * math.log(0.4) + 0.1 * (math.log(0.3) + math.log(0.2) + math.log(0.1)))
    t1 = -math.log(0.25)
    assert (t0 + t1) / 2 == pytest.approx(1.269649, abs=1e-5)
    assert qsft_loss(logits, targets, weights, mask).item() == pytest.approx((t0 + t1) / 2, abs=1e-5)
    # padding never counts: change everything at the padded position
    logits2 = logits.clone()
    logits2[0, 2] = torch.tensor([5.0, -3.0, 0.0, 9.0])
    weights2 = weights.clone()
    weights2[0, 2] = 0.0
    assert qsft_loss(logits2, targets, weights2, mask).item() == pytest.approx((t0 + t1) / 2, abs=1e-5)


def test_loss_with_unit_weights_is_cross_entropy_and_pushes_other_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, requires_grad=True)
    targets = torch.tensor([[1, 4, 0], [2, 2, 3]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    ce = F.cross_entropy(logits[mask.bool()], targets[mask.bool()])
    assert qsft_loss(logits, targets, torch.ones(2, 3), mask).item() == pytest.approx(ce.item(), abs=1e-6)
    # w = 0: the whole mass goes to the V-1 other tokens, so the gradient lowers the taken token's logit
    qsft_loss(logits, targets, torch.zeros(2, 3), mask).backward()
    assert logits.grad[0, 0, 1] > 0  # descent direction decreases it
    assert torch.all(logits.grad[1, 2] == 0)  # padded position: no gradient


# ------------------------------------------------------------------ Bellman targets
def test_bellman_targets_by_hand():
    # V = 3, two rows; row 0 has 3 valid tokens + padding, row 1 has 2 valid tokens.
    target = logits_of([
        [[1 / 3] * 3, [0.5, 0.3, 0.2], [0.2, 0.2, 0.6], [1 / 3] * 3],
        [[1 / 3] * 3, [0.1, 0.1, 0.8], [0.6, 0.2, 0.2], [1 / 3] * 3],
    ])
    behaviour = logits_of([
        [[1 / 3] * 3, [0.25, 0.5, 0.25], [0.5, 0.3, 0.2], [1 / 3] * 3],
        [[1 / 3] * 3, [0.2, 0.5, 0.3], [0.5, 0.3, 0.2], [1 / 3] * 3],
    ])
    # ratios p_target / π_β at position 1: row 0 [2, .6, .8], row 1 [.5, .2, 2.667]
    # ratios at position 2: row 0 [.4, .667, 3] (row 1's position 2 is padding)
    rewards = torch.tensor([[-0.8, 0.1, 0.3, 7.0], [0.2, 1.7, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    gamma = 0.9

    w = bellman_targets(rewards, target, behaviour, mask, gamma)  # max over the whole vocabulary
    expected = torch.tensor([
        [1.0, 1.0, 0.3, 0.0],  # -0.8 + .9*2 = 1.0 (clamped at 1 anyway); .1 + .9*3 -> 1; final = r
        [1.0, 1.0, 0.0, 0.0],  # .2 + .9*2 -> 1; final r = 1.7 -> clamped to 1
    ])
    assert torch.allclose(w, expected, atol=1e-5)

    w1 = bellman_targets(rewards, target, behaviour, mask, gamma, support_topk=1)  # max over π_β's argmax only
    expected1 = torch.tensor([
        [0.0, 0.1 + 0.9 * 0.4, 0.3, 0.0],  # -0.8 + .9*.6 = -.26 -> clamped to 0
        [0.2 + 0.9 * 0.2, 1.0, 0.0, 0.0],  # π_β's argmax at row 1 position 1 is token 1
    ])
    assert torch.allclose(w1, expected1, atol=1e-5)

    w2 = bellman_targets(rewards, target, behaviour, mask, gamma, support_topk=2)
    assert w2[0, 1].item() == pytest.approx(0.1 + 0.9 * (0.2 / 0.3), abs=1e-5)  # max(.4, .667) over π_β's top 2


def test_whole_vocabulary_max_ratio_is_never_below_one():
    """Both distributions sum to 1, so some ratio is >= 1: non-final targets are >= min(1, r + γ)."""
    torch.manual_seed(1)
    target, behaviour = torch.randn(3, 6, 50), torch.randn(3, 6, 50) * 3
    rewards = torch.full((3, 6), -0.3)
    mask = torch.ones(3, 6)
    w = bellman_targets(rewards, target, behaviour, mask, gamma=0.95)
    assert torch.all(w[:, :-1] >= 0.95 - 0.3 - 1e-6)
    assert torch.all(w[:, -1] == 0.0)  # final token: clamp(-0.3) = 0
    w_top = bellman_targets(rewards, target, behaviour, mask, gamma=0.95, support_topk=3)
    assert torch.any(w_top[:, :-1] < 0.95 - 0.3 - 1e-3)  # the support restriction lets values fall below


def test_rescale_rewards():
    # token level, returns in [-25, 0]: r / 25, plus 1 on the last token
    assert rescale_rewards([0.0, -1.0, -5.0, 0.0], None, "token", (-25.0, 0.0)) == \
        pytest.approx([0.0, -0.04, -0.2, 1.0])
    # rewards of either sign (chrF-like, returns in [0, 100]): the return 80 maps to 0.8
    out = rescale_rewards([10.0, 50.0, -5.0, 25.0], None, "token", (0.0, 100.0))
    assert out == pytest.approx([0.1, 0.5, -0.05, 0.25]) and sum(out) == pytest.approx(0.8)
    assert rescale_rewards([0.0, -5.0, 0.0], 80.0, "sentence", (0.0, 100.0)) == pytest.approx([0.0, 0.0, 0.8])
    assert rescale_rewards([0.0, 0.0], 130.0, "sentence", (0.0, 100.0)) == pytest.approx([0.0, 1.0])


def test_return_range_from_the_data_or_the_config():
    rows = [{"token_rewards": [0.0, -5.0, -1.0], "score": 0.2}, {"token_rewards": [-30.0, 0.0], "score": 0.9},
            {"token_rewards": [0.0], "score": 0.5}]
    assert resolve_return_range(rows, QSFTConfig(), "token") == (-30.0, 0.0)
    assert resolve_return_range(rows, QSFTConfig(), "sentence") == (0.2, 0.9)
    assert resolve_return_range(rows, QSFTConfig(return_range=(-25.0, 0.0)), "token") == (-25.0, 0.0)
    assert resolve_return_range(rows[:1], QSFTConfig(), "token") == (-6.0, -5.0)  # one return: a unit range, no 0/0
    # each row's rescaled return then lies in [0, 1], the lowest at 0 and the highest at 1
    lo_hi = resolve_return_range(rows, QSFTConfig(), "token")
    assert [sum(rescale_rewards(r["token_rewards"], None, "token", lo_hi)) for r in rows] == \
        pytest.approx([1 - 6 / 30, 0.0, 1.0])
    with pytest.raises(MtrlError, match="needs a 'score'"):
        resolve_return_range([{"token_rewards": [0.0]}], QSFTConfig(), "sentence")


def test_config_errors_name_the_key():
    from mtrl.recipe import recipe_from_dict

    for keys, words in [({"target": "td"}, "algorithm.target: 'td' is not allowed; allowed: 'bellman', 'monte_carlo'"),
                        ({"return_range": [1.0, 0.0]}, "algorithm.return_range"),
                        ({"temperature": 0.5}, "unknown key 'algorithm.temperature'"),
                        ({"reward_level": "token"}, "unknown key 'algorithm.reward_level'"),
                        ({"tau": 2.0}, r"algorithm.tau: must be in \[0, 1\]")]:
        with pytest.raises(MtrlError, match=words):
            recipe_from_dict({"policy": {"model": "mtrl:tiny-marian"}, "reward": {"mode": "token"},
                              "algorithm": {"name": "qsft", **keys}})


def test_config_holds_only_algorithm_keys():
    """The policy, languages, seed, reward level and sampling temperature come from the recipe's other sections."""
    names = {f.name for f in dataclasses.fields(QSFTConfig)}
    assert QSFTConfig().name == "qsft"
    assert not names & {"policy", "src_lang", "tgt_lang", "seed", "reward_level", "temperature"}


def test_monte_carlo_targets_by_hand():
    rewards = torch.tensor([[0.1, -0.2, 0.5, 9.0], [0.3, 0.9, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    w = monte_carlo_targets(rewards, mask, gamma=0.5)
    expected = torch.tensor([
        [0.1 + 0.5 * (-0.2 + 0.5 * 0.5), -0.2 + 0.5 * 0.5, 0.5, 0.0],  # padding's 9.0 never counts
        [0.3 + 0.5 * 0.9, 0.9, 0.0, 0.0],
    ])
    assert torch.allclose(w, expected, atol=1e-6)
    assert monte_carlo_targets(torch.tensor([[0.5, 0.9]]), torch.ones(1, 2), 1.0)[0, 0].item() == 1.0  # clamp
    assert monte_carlo_targets(torch.tensor([[-0.5, 0.2]]), torch.ones(1, 2), 1.0)[0, 0].item() == 0.0


# ------------------------------------------------------------------ Polyak, extraction
def test_polyak_update_by_hand():
    target, online = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        target.weight.copy_(torch.tensor([[1.0, 2.0]]))
        target.bias.fill_(0.0)
        online.weight.copy_(torch.tensor([[3.0, -2.0]]))
        online.bias.fill_(1.0)
    polyak_update(target, online, tau=0.25)
    assert torch.allclose(target.weight, torch.tensor([[1.5, 1.0]]))  # .75*1 + .25*3, .75*2 + .25*(-2)
    assert target.bias.item() == pytest.approx(0.25)
    assert torch.allclose(online.weight, torch.tensor([[3.0, -2.0]]))  # the online model is untouched


def test_combine_logprobs_by_hand():
    beh, q = torch.tensor([[0.5, 0.3, 0.2]]).log(), torch.tensor([[0.1, 0.6, 0.3]]).log()
    pi = combine_logprobs(beh, q, beta=2.0).softmax(-1)
    raw = torch.tensor([0.5 * 0.01, 0.3 * 0.36, 0.2 * 0.09])  # π_β p_θ^2
    assert torch.allclose(pi[0], raw / raw.sum(), atol=1e-6)
    assert torch.allclose(combine_logprobs(beh, q, 0.0).softmax(-1), torch.tensor([[0.5, 0.3, 0.2]]), atol=1e-6)


# ------------------------------------------------------------------ tiny models
SRC_MT = [("A man is riding a bike.", "Ein Mann fährt Fahrrad."), ("Two dogs play.", "Zwei Hunde spielen."),
          ("A cat sleeps.", "Eine Katze schläft."), ("A woman reads.", "Eine Frau liest ein Buch.")]


def make_rows(tok, kind: str) -> list[dict]:
    rows = []
    for src, mt in SRC_MT:
        ids = tok(text_target=mt).input_ids if kind == "seq2seq" else tok(mt).input_ids + [tok.eos_token_id]
        rewards = [0.0] * len(ids)
        rewards[1] = -5.0
        rows.append({"src": src, "mt": mt, "token_ids": ids, "token_rewards": rewards, "score": 0.6})
    return rows


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_seq2seq_train_and_translate(tiny_seq2seq: Path, tmp_path: Path):
    from mtrl.policy import Policy, load_model_and_tokenizer

    policy = Policy(*load_model_and_tokenizer(str(tiny_seq2seq)))
    tok_b, q = policy.tokenizer, policy.model
    init = flat(q)
    cfg = QSFTConfig(lr=1e-3, max_steps=2, sft_steps=2, batch_size=4, tau=0.5, logging_steps=1)
    history: list[dict] = []
    beh = train_qsft(policy, make_rows(tok_b, "seq2seq"), cfg, "token", 1.0, 0, history.append)
    assert [h["step"] for h in history] == [1, 2]  # the Q-SFT stage's rows; π_β's SFT stage logs none
    assert not torch.allclose(flat(q), init) and not torch.allclose(flat(beh), init)  # p_θ is the policy's model
    assert not torch.allclose(flat(q), flat(beh)) and not any(p.requires_grad for p in beh.parameters())

    sources = ["A man is riding a bike.", "Two dogs."]
    plain = beh.generate(**tok_b(sources, return_tensors="pt", padding=True), max_new_tokens=6, do_sample=False,
                         num_beams=1)
    # β = 0 is π_β's own greedy decoding; β > 0 runs and returns one string per source
    assert qsft_translate(policy, beh, sources, beta=0.0, max_new_tokens=6) == \
        tok_b.batch_decode(plain[:, 1:], skip_special_tokens=True)
    out = qsft_translate(policy, beh, sources, beta=1.0, max_new_tokens=6, num_beams=2)
    assert len(out) == 2 and all(isinstance(s, str) for s in out)

    # the processor adds β log p_θ of the right prefix (encoder outputs reused), both read at the temperature
    enc = tok_b(sources, return_tensors="pt", padding=True)
    prefix = plain[:, :3]
    with torch.no_grad():
        b_logits = beh(**enc, decoder_input_ids=prefix).logits[:, -1]
        q_logits = q(**enc, decoder_input_ids=prefix).logits[:, -1]
    for temp in (1.0, 0.5):
        proc = QSFTLogitsProcessor(q, 0.7, "seq2seq", enc.input_ids, enc.attention_mask, temperature=temp)
        assert torch.allclose(proc(prefix, b_logits), combine_logprobs(b_logits / temp, q_logits / temp, 0.7),
                              atol=1e-4)


def test_causal_trainer_steps_polyak_and_processor(tiny_causal: Path, tmp_path: Path, monkeypatch):
    from mtrl.algorithms import qsft
    from mtrl.policy import Policy, load_model_and_tokenizer

    model, tok, kind = load_model_and_tokenizer(str(tiny_causal))
    policy = Policy(model, tok, kind)
    cfg = QSFTConfig(lr=1e-3, max_steps=3, batch_size=2, tau=0.3, logging_steps=1, return_range=(-25.0, 0.0))
    feats = build_features(make_rows(tok, "causal"), policy, cfg)
    # prompt tokens never count: labels are -100 exactly on the prompt, rewards sit on the hypothesis
    n_prompt = len(policy.encode_sources([SRC_MT[0][0]])[0][0])
    assert feats[0]["labels"][:n_prompt] == [-100] * n_prompt and feats[0]["labels"][n_prompt] != -100
    assert feats[0]["rewards"][-1] == pytest.approx(1.0) and feats[0]["rewards"][n_prompt + 1] == pytest.approx(-0.2)
    batch = pad_batch(feats[:2], tok.pad_token_id, ["rewards"])
    assert batch["attention_mask"].sum(1).tolist() == [len(f["input_ids"]) for f in feats[:2]]

    init = flat(model)
    target, behaviour = copy.deepcopy(model), copy.deepcopy(model)
    # the loss reads all three models at the rows' temperature; at the start p_θ̄ = π_β, so every ratio is 1
    with torch.no_grad():
        logits, targets, mask, rewards = token_logits(model, batch, kind)
        logits = logits / 0.5
        weights = torch.cat([(rewards[:, :-1] + mask[:, 1:]).clamp(0, 1), rewards[:, -1:].clamp(0, 1)], 1) * mask
        loss, _ = batch_loss(model, batch, kind, cfg, 0.5, target, behaviour)
        assert loss.item() == pytest.approx(qsft_loss(logits, targets, weights, mask).item(), rel=1e-5)
    moves, polyak = [], qsft.polyak_update  # the target copy follows p_θ after every optimizer step
    monkeypatch.setattr(qsft, "polyak_update", lambda t, o, tau: moves.append((t, tau)) or polyak(t, o, tau))
    history: list[dict] = []
    behaviour = train_qsft(policy, make_rows(tok, "causal"), cfg, "token", 1.0, 0, history.append)
    assert [h["step"] for h in history] == [1, 2, 3]  # logging_steps 1
    assert len(moves) == 3 and all(tau == 0.3 for _, tau in moves)
    online, tgt = flat(model), flat(moves[0][0])
    assert not torch.allclose(online, init)
    assert not torch.allclose(tgt, init) and not torch.allclose(tgt, online)  # moved part of the way
    assert torch.allclose(flat(behaviour), init)  # π_β (sft_steps 0) is the initial model, frozen
    assert all(0.0 <= h["qsft_target_mean"] <= 1.0 for h in history)

    # processor with left-padded prompts of different lengths = p_θ on each prompt alone
    sources = ["A cat.", "Two dogs play in the snow near the river."]
    queries, qmask = Policy(behaviour, tok, kind).encode_sources(sources)
    assert (qmask == 0).any()
    proc = QSFTLogitsProcessor(model, 1.0, "causal", queries, qmask)
    got = proc.q_logits(queries)
    for i, s in enumerate(sources):
        ids, _ = Policy(behaviour, tok, kind).encode_sources([s])
        with torch.no_grad():
            alone = model(input_ids=ids).logits[0, -1]
        assert torch.allclose(got[i], alone, atol=1e-4)
    out = qsft_translate(policy, behaviour, sources, beta=2.0, max_new_tokens=5)
    assert len(out) == 2 and all(isinstance(s, str) for s in out)


def test_build_features_names_a_bad_row(tiny_seq2seq: Path):
    from mtrl.policy import Policy, load_model_and_tokenizer

    model, tok, kind = load_model_and_tokenizer(str(tiny_seq2seq))
    rows = make_rows(tok, "seq2seq")
    rows[2] = {**rows[2], "token_rewards": rows[2]["token_rewards"][:-1]}
    with pytest.raises(MtrlError, match="qsft row 2: token_ids and token_rewards"):
        build_features(rows, Policy(model, tok, kind), QSFTConfig())


def test_forced_language_token_is_not_trained(tiny_nllb: Path):
    from mtrl.policy import Policy, PolicyConfig, load_model_and_tokenizer

    model, tok, kind = load_model_and_tokenizer(str(tiny_nllb))
    policy = Policy(model, tok, kind, PolicyConfig(model="", src_lang_code="eng_Latn", tgt_lang_code="deu_Latn"))
    lang = policy.forced_bos_token_id
    ids = [lang] + tok(text_target="Ein Hund.").input_ids
    row = {"src": "A dog.", "mt": "Ein Hund.", "token_ids": ids, "token_rewards": [0.0] * len(ids)}
    feat = build_features([row], policy, QSFTConfig())[0]
    assert feat["labels"][0] == -100 and feat["labels"][1:] == ids[1:]
    assert feat["decoder_input_ids"] == [model.config.decoder_start_token_id] + ids[:-1]  # still fed as input

"""Tests for the embedded tokenizer and tiny Llama model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from dist_unlearn.data import QADataset, collate_qa, generate_facts
from dist_unlearn.models import build_embedded_model, build_tiny_llama, train_tokenizer


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return generate_facts(num_people=10, seed=5).corpus()


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_tokenizer(corpus, vocab_size=600)


def test_tokenizer_round_trip(tokenizer, corpus) -> None:
    assert len(tokenizer) <= 600
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == (
        "<pad>",
        "<s>",
        "</s>",
        "<unk>",
    )
    assert tokenizer.padding_side == "right"
    assert tokenizer.model_max_length == 256
    specials = set(tokenizer.all_special_ids)
    unseen = ["Zürich  has   spaces\tand\nnewlines!", "emoji 🙂 and 漢字", " leading space", "x"]
    for text in corpus[:50] + unseen:
        ids = tokenizer(text)["input_ids"]
        assert not specials & set(ids), text
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text
    # BPE actually learned merges: a corpus sentence is much shorter than its byte count
    sentence = corpus[1]
    assert len(tokenizer(sentence)["input_ids"]) < len(sentence.encode()) / 2


def test_tokenizer_save_load(tokenizer, corpus, tmp_path) -> None:
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == len(tokenizer)
    for attr in ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id", "padding_side"):
        assert getattr(loaded, attr) == getattr(tokenizer, attr)
    for text in corpus[:20]:
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
        assert loaded.decode(loaded(text)["input_ids"]) == text


def test_train_tokenizer_errors() -> None:
    with pytest.raises(ValueError, match="corpus"):
        train_tokenizer([])
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["hello"], vocab_size=100)


def test_build_tiny_llama_deterministic() -> None:
    kwargs = {"vocab_size": 300, "hidden_size": 32, "num_layers": 2, "num_heads": 4}
    state = torch.random.get_rng_state()
    a = build_tiny_llama(**kwargs, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    b = build_tiny_llama(**kwargs, seed=1)
    c = build_tiny_llama(**kwargs, seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    cfg = a.config
    assert cfg.tie_word_embeddings and a.lm_head.weight.data_ptr() == a.model.embed_tokens.weight.data_ptr()
    assert cfg.num_key_value_heads == 2 and cfg.attention_dropout == 0.0
    assert build_tiny_llama(300, hidden_size=30, num_heads=3, num_layers=1).config.num_key_value_heads == 3
    with pytest.raises(ValueError, match="divisible"):
        build_tiny_llama(300, hidden_size=30, num_heads=4)


def test_build_embedded_model(corpus) -> None:
    model, tokenizer = build_embedded_model(corpus, vocab_size=512, hidden_size=32, num_layers=1, num_heads=2)
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.bos_token_id == tokenizer.bos_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id
    ids = torch.tensor([tokenizer("Where was")["input_ids"]])
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_embedded_model_memorises_small_benchmark() -> None:
    torch.manual_seed(0)
    bench = generate_facts(num_people=6, questions_per_person=2)
    model, tokenizer = build_embedded_model(bench.corpus())
    batch = collate_qa(list(QADataset(bench.items, tokenizer, max_length=64)), tokenizer.pad_token_id)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}

    def answer_nll() -> float:
        model.eval()
        with torch.no_grad():
            return float(model(**inputs).loss)

    initial = answer_nll()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(80):
        loss = model(**inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final = answer_nll()
    assert final < 0.3 * initial, (initial, final)

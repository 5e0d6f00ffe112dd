"""MUSE: raw-text training windows, VerbMem / KnowMem against hand-computed ROUGE-L F1, the MUSE-layout
loader, and a short GA run on the raw forget text evaluated with VerbMem, KnowMem and PrivLeak."""

from __future__ import annotations

import json

import pytest
import torch

from dist_unlearn.data.facts import QAItem
from dist_unlearn.data.formats import MuseBenchmark, load_formatted, source_problem
from dist_unlearn.data.qa import IGNORE_INDEX, QADataset, collate_qa, encode_text_windows, prefix_ids
from dist_unlearn.eval.muse import (
    knowmem_answer,
    knowmem_prompt,
    knowmem_score,
    verbmem_examples_from_pairs,
    verbmem_examples_from_texts,
    verbmem_score,
)

# ---- hand-computed ROUGE-L F1 (rouge-score tokens: lower-cased alphanumeric words, no stemming) ----
# ref "the cat sat on the mat" (6) vs "the cat lay on a mat" (6): LCS the,cat,on,mat = 4 → P = R = 4/6, F = 2/3
# ref "paris is the capital" (4) vs "the capital is paris" (4): LCS length 2 (e.g. the,capital) → F = 1/2
# ref "red apples" (2) vs "red red apples and pears" (5): LCS 2 → P = 2/5, R = 1, F = 2·0.4/(1.4) = 4/7


def test_verbmem_score_is_mean_rouge_l_f1_times_100():
    refs = ["the cat sat on the mat", "Paris is the capital", "red apples"]
    outs = ["The cat lay on a mat.", "the capital is Paris", "red red apples and pears"]
    expected = 100 * (2 / 3 + 1 / 2 + 4 / 7) / 3
    assert verbmem_score(refs, outs) == pytest.approx(expected, abs=1e-9)
    assert verbmem_score(["same words here"], ["same words here"]) == pytest.approx(100.0)
    assert verbmem_score(["alpha"], ["beta"]) == 0.0


def test_knowmem_cuts_the_answer_and_scores_f1():
    # the generation continues into a next question: MUSE keeps what precedes "\n\n" / "\nQuestion" / "Question:"
    assert knowmem_answer(" Marie Curie\n\nQuestion: who else?") == " Marie Curie"
    assert knowmem_answer("1903 Question: next") == "1903 "
    assert knowmem_answer("in Warsaw\nQuestion") == "in Warsaw"
    answers = ["Marie Curie", "the year 1903"]
    generations = ["Marie Curie\n\nQuestion: x", "in 1903 Question: y"]
    # 1: exact → 1; 2: ref [the, year, 1903] vs [in, 1903]: LCS 1, P = 1/2, R = 1/3, F = 2·(1/6)/(5/6) = 2/5
    assert knowmem_score(answers, generations) == pytest.approx(100 * (1 + 2 / 5) / 2, abs=1e-9)


def test_knowmem_prompt_is_muse_few_shot():
    icl = [QAItem("", "", "Q1?", "A1", "A1", (), "forget"), QAItem("", "", "Q2?", "A2", "A2", (), "forget")]
    assert (
        knowmem_prompt("Q?", icl) == "Question: Q1?\nAnswer: A1\n\nQuestion: Q2?\nAnswer: A2\n\nQuestion: Q?\nAnswer: "
    )
    assert knowmem_prompt("Q?") == "Question: Q?\nAnswer: "


# ---- MUSE-layout fixture -------------------------------------------------------------------------
_WORDS = [
    "amber",
    "brook",
    "cedar",
    "delta",
    "ember",
    "fjord",
    "glade",
    "harbor",
    "island",
    "juniper",
    "kestrel",
    "lantern",
    "meadow",
    "north",
]


def _doc(seed: int, n: int = 40) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(_WORDS[int(i)] for i in torch.randint(len(_WORDS), (n,), generator=g)) + "."


def _write_muse_layout(root, with_eval_files: bool = False) -> None:
    def write(name: str, data) -> None:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(data) if not isinstance(data, str) else data)

    write("raw/forget.json", [{"text": _doc(s)} for s in range(3)])
    write("raw/retain1.json", [_doc(s) for s in range(10, 13)])
    write("raw/holdout.json", [_doc(s) for s in range(20, 23)])
    write("raw/retain2.txt", _doc(30))
    qa = lambda p, n: [{"question": f"{p} question {i}?", "answer": f"{_WORDS[i]} {_WORDS[i + 1]}"} for i in range(n)]  # noqa: E731
    write("knowmem/forget_qa.json", qa("forget", 3))
    write("knowmem/forget_qa_icl.json", qa("example", 1))
    write("knowmem/retain_qa.json", qa("retain", 3))
    if with_eval_files:
        write("verbmem/forget.json", [{"prompt": "amber brook", "gt": "cedar delta ember"}])
        write("privleak/forget.json", ["forget text one", "forget text two"])
        write("privleak/holdout.json", ["holdout text"])


def test_muse_layout_loads_raw_text_and_eval_files(tmp_path):
    _write_muse_layout(tmp_path, with_eval_files=True)
    facts = load_formatted(f"muse:{tmp_path}")
    assert isinstance(facts, MuseBenchmark)
    assert [len(facts.split(s)) for s in ("forget", "retain", "holdout")] == [3, 3, 3]
    first = facts.split("forget")[0]
    assert (first.question, first.answer) == ("", _doc(0))  # raw text: no question
    assert facts.split("retain")[0].answer == _doc(10)  # retain term = raw/retain1
    assert [it.answer for it in facts.evaluation_split("forget")] == ["forget text one", "forget text two"]
    assert [it.answer for it in facts.evaluation_split("holdout")] == ["holdout text"]
    assert facts.evaluation_split("retain") == facts.split("retain")  # no privleak/retain: training split
    assert [it.answer for it in facts.evaluation_split("retain2")] == [_doc(30)]
    assert facts.verbmem_pairs() == [("amber brook", "cedar delta ember")]
    qa, icl = facts.knowmem_set("forget")
    assert [it.question for it in qa] == [f"forget question {i}?" for i in range(3)]
    assert [it.question for it in icl] == ["example question 0?"]
    assert facts.knowmem_set("retain")[1] == [] and len(facts.knowmem_set("retain")[0]) == 3
    assert source_problem(f"muse:{tmp_path}") is None


def test_muse_without_raw_corpora_names_them(tmp_path):
    (tmp_path / "forget_qa.json").write_text(json.dumps([{"question": "Who?", "answer": "Her."}]))
    assert "lacks the raw/forget and raw/retain1 subset" in source_problem(f"muse:{tmp_path}")
    with pytest.raises(ValueError, match="lacks the raw forget or retain corpus"):
        load_formatted(f"muse:{tmp_path}")


# ---- raw-text windows ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def muse_setup(tmp_path_factory):
    from dist_unlearn.models import build_embedded_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest, and stays fast on a busy machine
    root = tmp_path_factory.mktemp("muse")
    _write_muse_layout(root)
    facts = load_formatted(f"muse:{root}")
    corpus = [it.answer for it in facts.items] + [
        q for n in ("forget", "retain") for it in facts.knowmem_set(n)[0] for q in (it.question, it.answer)
    ]
    model, tok = build_embedded_model(corpus, vocab_size=300, hidden_size=64, num_layers=2, num_heads=2, seed=0)
    yield facts, model, tok, root
    torch.set_num_threads(threads)


def test_raw_text_windows_cover_every_token_once(muse_setup):
    facts, _, tok, _ = muse_setup
    text = facts.split("forget")[0].answer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    bos = prefix_ids(tok)
    assert bos == [tok.bos_token_id]
    windows = encode_text_windows(tok, text, max_length=16)
    assert len(windows) == -(-len(ids) // 15)
    assert all(len(w["input_ids"]) <= 16 and w["input_ids"][:1] == bos for w in windows)
    # no prompt: every text token is a label (only bos is ignored), in order, exactly once
    assert [t for w in windows for t in w["labels"] if t != IGNORE_INDEX] == ids
    assert all(w["labels"][0] == IGNORE_INDEX and w["labels"][1:] == w["input_ids"][1:] for w in windows)
    dataset = QADataset(facts.split("forget"), tok, 16)
    assert len(dataset) == sum(len(encode_text_windows(tok, it.answer, 16)) for it in facts.split("forget"))
    assert dataset[0]["input_ids"] == windows[0]["input_ids"] and dataset.items[0] is facts.split("forget")[0]
    batch = collate_qa([dataset[i] for i in range(3)], tok.pad_token_id)
    assert (batch["labels"] != IGNORE_INDEX).sum() == sum(len(dataset[i]["input_ids"]) - 1 for i in range(3))


def test_verbmem_excerpts(muse_setup):
    _, _, tok, _ = muse_setup
    text = _doc(0)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    examples = verbmem_examples_from_texts(tok, [text], prompt_tokens=8, continuation_tokens=16)
    assert len(examples) == sum(len(ids[i : i + 24]) > 8 for i in range(0, len(ids), 24))
    prompt, gt = examples[0]
    assert prompt == [tok.bos_token_id, *ids[:8]]
    assert gt == tok.decode(ids[8:24], skip_special_tokens=True)
    ((prompt, gt),) = verbmem_examples_from_pairs(tok, [("amber brook", text)], max_new_tokens=5)
    assert prompt == [tok.bos_token_id, *tok("amber brook", add_special_tokens=False)["input_ids"]]
    assert gt == tok.decode(ids[:4], skip_special_tokens=True)  # MUSE's gt_short: [bos] + 4 tokens


# ---- end to end: target → GA on raw forget text → MUSE evaluation with the retrained model's PrivLeak ----
def test_ga_on_raw_forget_text_lowers_verbmem_and_reports_muse(muse_setup, tmp_path):
    import copy
    import dataclasses

    from dist_unlearn.eval.suite import EvalSettings, evaluate_model, headline
    from dist_unlearn.models.finetune import finetune
    from dist_unlearn.unlearning import get_objective
    from dist_unlearn.unlearning.streams import StepBatches, qa_streams

    facts, base, tok, root = muse_setup
    length, pad = 24, tok.pad_token_id
    train = QADataset(facts.split("forget") + facts.split("retain"), tok, length)
    target, retrained = copy.deepcopy(base), copy.deepcopy(base)
    finetune(target, train, pad, steps=200, batch_size=16, lr=1e-2, seed=0)
    finetune(retrained, QADataset(facts.split("retain"), tok, length), pad, steps=100, batch_size=16, lr=1e-2, seed=0)

    settings = EvalSettings(
        max_length=length,
        sampled_generations=0,
        verbmem_prompt_tokens=8,
        verbmem_max_new_tokens=16,
        knowmem_max_new_tokens=6,
        batch_size=16,
    )
    reference = evaluate_model(retrained, tok, facts, dataclasses.replace(settings, generate=False))
    before = evaluate_model(target, tok, facts, settings, reference)

    objective = get_objective("grad_diff")  # GA on the raw forget windows + NLL on the raw retain1 windows
    streams = qa_streams(facts.split, objective.needs, tok, length)
    assert set(streams) == {"forget", "retain"} and len(streams["forget"]) > len(facts.split("forget"))
    batches = StepBatches(
        streams,
        objective.needs,
        forget_batch_size=4,
        retain_batch_size=4,
        rank=0,
        world_size=1,
        seed=0,
        pad_token_id=pad,
    )
    unlearned = copy.deepcopy(target)
    optimizer = torch.optim.AdamW(unlearned.parameters(), lr=3e-3)
    unlearned.train()
    for step in range(8):
        loss = objective(unlearned, batches.batch(step), reference=None).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = evaluate_model(unlearned, tok, facts, settings, reference)

    for result in (before, after):
        assert {"verbmem_forget", "knowmem_forget", "knowmem_retain", "privleak"} <= set(result)
        assert all(0 <= result[k] <= 100 for k in ("verbmem_forget", "knowmem_forget", "knowmem_retain"))
        h = headline(result)
        assert h["verbmem_forget"] == result["verbmem_forget"] and h["privleak"] == result["privleak"]
        assert "rouge" not in result["splits"]["forget"]  # raw text: no QA generation
    details = before["per_example"]["muse"]
    assert details["verbmem_forget"]["count"] == len(
        verbmem_examples_from_texts(tok, [it.answer for it in facts.split("forget")], 8, 16)
    )
    assert details["knowmem_forget"]["count"] == 3 and details["knowmem_retain"]["count"] == 3
    # the target memorised its forget text; GA on it removes that (VerbMem down, forget NLL up)
    assert before["verbmem_forget"] > 30  # 39.5 here
    assert after["verbmem_forget"] < before["verbmem_forget"] / 2  # 8.1 here
    assert after["splits"]["forget"]["prob"] < before["splits"]["forget"]["prob"]
    # PrivLeak in MUSE's orientation: the target (saw the forget text) is strongly negative, the
    # retrained model against itself is 0
    assert before["privleak"] < -50  # −100 here; −9.2 after GA
    assert evaluate_model(retrained, tok, facts, dataclasses.replace(settings, generate=False), reference)[
        "privleak"
    ] == pytest.approx(0.0)

    # the same through saved directories and the config: dist-unlearn eval's one-process path with the
    # retrained model by path (eval.oracle_dir) and MUSE's default lengths (32-token prompts, 128 / 32 new tokens)
    from dist_unlearn.config import ConfigError, load_config
    from dist_unlearn.engine.eval_job import run_eval_without_ray

    for name, model in (("target", target), ("retrained", retrained)):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    (tmp_path / "run.yaml").write_text("model: {path: embedded}\n")
    overrides = [
        f"model.path={tmp_path / 'target'}",
        f"data.source=muse:{root}",
        f"data.max_length={length}",
        "eval.sampled_generations=0",
        f"eval.model_dir={tmp_path / 'target'}",
        f"eval.oracle_dir={tmp_path / 'retrained'}",
        f"output.dir={tmp_path / 'out'}",
        "ray.enabled=false",
    ]
    assert run_eval_without_ray(load_config(tmp_path / "run.yaml", overrides)) == {"target": str(tmp_path / "target")}
    evaluation = json.loads((tmp_path / "out" / "target" / "eval.json").read_text())
    result = evaluation["result"]
    assert result["privleak"] == pytest.approx(before["privleak"], abs=1e-6)
    assert evaluation["oracle"]["privleak_auc"] == pytest.approx(reference["privleak_auc"], abs=1e-6)
    assert {"verbmem_forget", "knowmem_forget", "knowmem_retain"} <= set(result)
    assert result["per_example"]["muse"]["verbmem_forget"]["count"] == len(facts.split("forget"))  # one excerpt each
    with pytest.raises(ConfigError, match="eval.oracle_dir: .* has no config.json"):
        load_config(tmp_path / "run.yaml", [*overrides[:-3], f"eval.oracle_dir={tmp_path / 'missing'}"])

"""The multiple-choice path of decoder LLMs (`data.kind: multiple_choice`): every choice scored by its token
log-likelihood after the question, one packed row per question; the JSONL loader; the run config end to end.

Fast path only: a tiny random Llama (tests/tiny_models.py) with a word-level tokenizer, and 'tiny:llama' (BERT
tokenizer of the offline MiniLM package) for the run config."""

from __future__ import annotations

import json

import pytest
import tiny_models
import torch
import yaml
from tiny_models import build

from lora_ensemble import LoraEnsemble
from lora_ensemble.app.data import load_dataset
from lora_ensemble.app.data.prompts import ChoiceCollator
from lora_ensemble.app.run_config import ConfigError, ModelConfig, parse_run_config
from lora_ensemble.interop.causal_lm import CausalLMChoiceScorer, choice_log_likelihoods

M = 3
TEMPLATE = "Article: {text}\nTopic:"
CHOICES = ["business", "sport", "tech"]
WORDS = (["[UNK]", "[PAD]", "<s>", "Article:", "Topic:", "business", "sport", "tech", "big", "small"]
         + [f"w{i}" for i in range(40)])  # 50 = tiny VOCAB


def word_tokenizer():
    return tiny_models.word_tokenizer(WORDS)


def article(n: int) -> str:
    return " ".join(f"w{i % 40}" for i in range(n))


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def randomize_B(ens: LoraEnsemble) -> LoraEnsemble:
    return tiny_models.randomize_lora_B(ens)


ITEMS = [({"question": article(3), "choices": ["business", "sport tech", "big small tech"]}, 0),
         (article(9), 2),                                                   # plain text: the class names
         ({"question": article(1), "choices": ["small", "tech", "sport big"]}, 1)]


@pytest.mark.parametrize(("share_trunk", "score", "attention"),
                         [(False, "sum", "sdpa"), (True, "sum", "sdpa"), (False, "mean", "sdpa"), (True, "mean", "sdpa"),
                          (True, "sum", "eager")])
def test_class_logits_of_every_member_are_its_own_log_likelihood_of_each_choice(share_trunk, score, attention):
    tokenizer = word_tokenizer()
    collate = ChoiceCollator(tokenizer, TEMPLATE, max_length=40, num_choices=3, choices=CHOICES)
    batch = collate(ITEMS)
    llama = build("llama_lm")[0]
    llama.set_attn_implementation(attention)            # eager takes the packed mask as an additive float mask
    scorer = CausalLMChoiceScorer(llama, 3, score=score)
    assert scorer.attention == attention
    ens = randomize_B(LoraEnsemble(scorer, num_members=M, r=2,
                                   layers=[-1] if share_trunk else None, share_trunk=share_trunk, seed=1))
    assert ens.head_names == [] and all("lora_" in n for n in ens.member_parameters())  # LM head shared, frozen
    with torch.no_grad():
        logits = ens(input_ids=batch["input_ids"], segment_ids=batch["segment_ids"])
    assert logits.shape == (M, len(ITEMS), 3)
    prompt = [WORDS.index("<s>"), WORDS.index("Article:")]
    cue = [WORDS.index("Topic:")]
    for m in range(M):
        member = ens.member(m)                         # adapters merged into a standalone scorer
        lm = lambda input_ids, attention_mask=None, member=member: member.lm_head( 
            member.backbone(input_ids=input_ids, attention_mask=attention_mask)[0])
        for b, (raw, _) in enumerate(ITEMS):
            question, choices = (raw, CHOICES) if isinstance(raw, str) else (raw["question"], raw["choices"])
            head = prompt + ids_of(tokenizer, question) + cue
            rows = [head + ids_of(tokenizer, " " + c) for c in choices]
            expected = []
            for row, choice in zip(rows, choices):      # a plain forward of question + this choice alone
                with torch.no_grad():
                    logp = lm(torch.tensor([row]))[0].log_softmax(-1)
                n = len(ids_of(tokenizer, choice))
                ll = sum(logp[len(head) - 1 + t, row[len(head) + t]] for t in range(n))
                expected.append(ll / n if score == "mean" else ll)
            torch.testing.assert_close(logits[m, b], torch.stack(expected), atol=2e-5, rtol=1e-4)
            # the same numbers as choice_log_likelihoods on one (question, choice) row per choice
            T = max(map(len, rows))
            ids = torch.tensor([[r + [1] * (T - len(r)) for r in rows]])
            mask = torch.tensor([[[1] * len(r) + [0] * (T - len(r)) for r in rows]])
            choice = torch.tensor([[[0] * len(head) + [1] * (len(r) - len(head)) + [0] * (T - len(r)) for r in rows]])
            with torch.no_grad():
                reference = choice_log_likelihoods(lm, ids, mask, choice, normalize=score == "mean")
            torch.testing.assert_close(logits[m, b], reference[0, 0], atol=2e-5, rtol=1e-4)
    assert not torch.allclose(logits[0], logits[1])    # the members do differ


def test_a_long_question_is_truncated_never_a_choice_or_the_cue():
    tokenizer = word_tokenizer()
    choices = ["big small tech", "sport", "business"]
    collate = ChoiceCollator(tokenizer, TEMPLATE, max_length=20, num_choices=3)
    fixed = 1 + 1 + 1                                   # <s>, "Article:", "Topic:"
    assert collate.budget_for(choices) == 20 - fixed - 3
    batch = collate([({"question": article(200), "choices": choices}, 1)])
    row, seg = batch["input_ids"][0].tolist(), batch["segment_ids"][0].tolist()
    question = ids_of(tokenizer, article(20 - fixed - 3))   # the question's first tokens
    packed = [2, 3] + question + [4]
    assert row == packed + [t for c in choices for t in ids_of(tokenizer, " " + c)]
    assert seg == [0] * len(packed) + [1, 1, 1, 2, 3]
    assert len(packed) + 3 == 20                       # question + its longest choice fill max_length exactly
    with pytest.raises(ValueError, match=r"the choice 'big small tech' 3; max_length=5 leaves no room"):
        ChoiceCollator(tokenizer, TEMPLATE, max_length=5, num_choices=3)(
            [({"question": "w1", "choices": choices}, 0)])
    with pytest.raises(ValueError, match=r"item 0 of the batch has 2 choices, but this dataset has 3"):
        collate([({"question": "w1", "choices": ["sport", "tech"]}, 0)])
    with pytest.raises(ValueError, match=r"lists no \{choices\}"):
        ChoiceCollator(tokenizer, "{text}\n{choices}\nAnswer:", 20, 3)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def questions(n: int, k: int = 3) -> list[dict]:
    return [{"question": f"question {i} is", "choices": [f"answer {j} of {i}" for j in range(k)], "answer": i % k}
            for i in range(n)]


def test_jsonl_loader_splits_the_file_and_names_every_bad_row(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", questions(30))
    ood = write_jsonl(tmp_path / "ood.jsonl", [{"question": "other", "choices": ["a", "b", "c"]}] * 4)
    splits = load_dataset("jsonl_multiple_choice", path=str(path), ood_path=str(ood))
    assert splits.class_names == ["A", "B", "C"] and splits.modality == "text"
    assert (len(splits.train), len(splits.val), len(splits.test), len(splits.ood)) == (21, 3, 6, 4)
    item, answer = splits.test[0]
    assert set(item) == {"question", "choices"} and len(item["choices"]) == 3 and 0 <= answer < 3
    assert splits.ood[0][1] == -1
    load = lambda rows, **kw: load_dataset("jsonl_multiple_choice",
                                           path=str(write_jsonl(tmp_path / "bad.jsonl", rows)), **kw)
    with pytest.raises(FileNotFoundError, match=r"multiple-choice file .*missing.jsonl does not exist"):
        load_dataset("jsonl_multiple_choice", path=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match=r"bad.jsonl line 2 lacks field\(s\) \['answer'\]"):
        load([questions(1)[0], {"question": "q", "choices": ["a", "b", "c"]}])
    with pytest.raises(ValueError, match=r"line 1: answer 3 is not an index into its 3 choices \(an integer 0..2\)"):
        load([{"question": "q", "choices": ["a", "b", "c"], "answer": 3}])
    with pytest.raises(ValueError, match=r"line 2 has 2 choices but line 1 has 3; .*one fixed number of choices"):
        load([questions(1)[0], {"question": "q", "choices": ["a", "b"], "answer": 0}])
    with pytest.raises(ValueError, match=r"line 1 is not valid JSON"):
        load(["{not json"])
    with pytest.raises(ValueError, match=r"line 1: choices must be a list of at least 2 non-empty strings"):
        load([{"question": "q", "choices": ["a", ""], "answer": 0}])
    with pytest.raises(ValueError, match=r"ood.jsonl line 1 has 2 choices but the training file has 3"):
        load_dataset("jsonl_multiple_choice", path=str(path),
                     ood_path=str(write_jsonl(tmp_path / "ood.jsonl", [{"question": "q", "choices": ["a", "b"]}])))


def test_data_kind_and_choice_score_are_checked_in_the_run_config():
    assert parse_run_config({}).data.kind == "classification"
    assert parse_run_config({"data": {"kind": "multiple_choice", "choice_score": "mean"}}).data.choice_score == "mean"
    with pytest.raises(ConfigError, match=r"^data.kind: expected one of \['classification', 'multiple_choice'\], "
                                          r"got 'ranking'$"):
        parse_run_config({"data": {"kind": "ranking"}})
    with pytest.raises(ConfigError, match=r"^data.choice_score: expected one of \['sum', 'mean'\], got 'max'$"):
        parse_run_config({"data": {"kind": "multiple_choice", "choice_score": "max"}})
    with pytest.raises(ConfigError, match=r"data.choice_score: 'mean' scores the choices of data.kind: multiple"):
        parse_run_config({"data": {"choice_score": "mean"}})
    from lora_ensemble.app.builders import build_model

    with pytest.raises(ConfigError, match=r"data.kind: multiple_choice scores each choice by a causal LM's"):
        build_model(ModelConfig(name="tiny:text"), 3, "text", kind="multiple_choice")
    with pytest.raises(ConfigError, match=r"model.head: 'verbalizer' is for data.kind: classification"):
        build_model(ModelConfig(name="tiny:llama", head="verbalizer"), 3, "text", class_names=CHOICES,
                    dataset="jsonl_multiple_choice", kind="multiple_choice")


@pytest.mark.parametrize("cache_trunk", [False, True])
def test_a_multiple_choice_run_fits_and_evaluates_end_to_end_from_its_config(tmp_path, capsys, cache_trunk):
    from lora_ensemble.app.cli import main

    data = write_jsonl(tmp_path / "q.jsonl", questions(24, k=4))
    ood = write_jsonl(tmp_path / "ood.jsonl", [{"question": f"other {i}", "choices": list("abcd")} for i in range(4)])
    config = {"seed": 0, "model": {"name": "tiny:llama", "max_length": 32},
              "method": {"name": "lora_ensemble", "num_members": 2, "r": 2, "target_modules": "qv", "layers": [-1],
                         "share_trunk": True},
              "data": {"name": "jsonl_multiple_choice", "kind": "multiple_choice", "path": str(data),
                       "ood_path": str(ood), "batch_size": 4},
              "training": {"epochs": 2, "lr": 1e-2, "cache_trunk": cache_trunk, "progress_bar": False}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "run"
    assert main(["fit", "--config", str(tmp_path / "run.yaml"), "--output-dir", str(run_dir)]) == 0
    results = json.loads((run_dir / "results.json").read_text())
    metrics = results["metrics"]
    assert {"acc", "nll", "ece", "brier"} <= set(metrics) and 0 <= metrics["acc"] <= 1
    assert any(k.startswith("ood/") for k in metrics), sorted(metrics)   # OOD metrics from ood_path
    if cache_trunk:                                     # epoch 2 replays the packed rows' cached trunk
        assert results["trunk_cache"]["replayed_batches"] > 0
    assert main(["evaluate", "--checkpoint", str(run_dir)]) == 0
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    torch.testing.assert_close(evaluation["metrics"]["nll"], metrics["nll"], atol=1e-5, rtol=1e-5)
    saved = yaml.safe_load((run_dir / "run_config.yaml").read_text())
    assert saved["data"]["kind"] == "multiple_choice" and saved["data"]["choice_score"] == "sum"
    from lora_ensemble.app.runner import load_run

    run = load_run(str(run_dir), with_data=False)
    with pytest.raises(TypeError, match="a plain text item but has no fixed choices"):
        run.collate([("a question without choices", 0)])   # a plain text has no choices in this run
    if not cache_trunk:
        _predict_reads_questions_with_their_own_choices(tmp_path, capsys, run_dir, run)


def _predict_reads_questions_with_their_own_choices(tmp_path, capsys, run_dir, run):
    from lora_ensemble.app.cli import main
    from lora_ensemble.metrics import predictive

    asked = [{"id": "q-a", "question": "question 3 is", "choices": ["x", "answer 1 of 3", "y", "z"]},
             {"question": "other 1", "choices": list("dcba"), "answer": 2}]      # an answer is ignored
    out = tmp_path / "pred.jsonl"
    assert main(["predict", "--checkpoint", str(run_dir), "--input", str(write_jsonl(tmp_path / "ask.jsonl", asked)),
                 "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["q-a", "1"]                              # its id, else its line number
    batch = run.collate([(q, 0) for q in asked])
    batch.pop("labels")
    with torch.no_grad():
        expected = predictive(run.module.method.eval()(**batch).float() / run.module.temperature).probs
    for row, question, p in zip(rows, asked, expected):
        torch.testing.assert_close(torch.tensor([row[f"p_{c}"] for c in "ABCD"], dtype=p.dtype), p, atol=1e-5, rtol=1e-5)
        k = int(p.argmax())
        assert row["prediction"] == "ABCD"[k] and row["choice"] == question["choices"][k]
    for bad, message in ((tmp_path / "plain.txt", "bring their own choices; give a .jsonl file"),
                         (write_jsonl(tmp_path / "three.jsonl", [{"question": "q", "choices": list("abc")}]),
                          "line 1 has 3 choices but the training file has 4")):
        if bad.suffix == ".txt":
            bad.write_text("a question without choices\n")
        capsys.readouterr()
        assert main(["predict", "--checkpoint", str(run_dir), "--input", str(bad)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err

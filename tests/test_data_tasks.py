"""Fine-tuning encoders turn records into padded rows, align word tags and weight only answers."""

import itertools
import re

import numpy as np
import pytest

from lm.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, train_tokenizer
from lm.tasks.classification import encode_classification
from lm.tasks.encoding import IGNORE_TAG, TaskStats
from lm.tasks.regression import encode_regression
from lm.tasks.text_to_text import encode_text_to_text
from lm.tasks.token_labels import encode_token_labels

SUBJECTS = ["the cat", "a dog", "my friend", "the old man", "her sister", "the bird"]
VERBS = ["sees", "likes", "finds", "follows", "watches"]
OBJECTS = ["the ball", "a red house", "the river", "some bread", "the garden", "a small tree"]
RARE_WORD = "xylophones"  # absent from the corpus, so split into several pieces


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    lines = [f"{s} {v} {o}." for s, v, o in itertools.product(SUBJECTS, VERBS, OBJECTS)]
    return train_tokenizer(lines, tmp_path_factory.mktemp("tok") / "t.model", vocab_size=400)


def test_classification_rows_are_bos_text_eos_padded(tokenizer):
    texts = ["the cat sees the ball.", "a dog"]
    arrays, stats = encode_classification(tokenizer, texts, [1, np.int64(0)], 2, seq_len=16)
    assert sorted(arrays) == ["inputs", "label", "positions", "segment_ids"]
    assert arrays["inputs"].shape == arrays["segment_ids"].shape == (2, 16)
    assert arrays["label"].dtype == np.int32 and arrays["label"].tolist() == [1, 0]
    for row, text in enumerate(texts):
        ids = [BOS_ID, *tokenizer.encode(text), EOS_ID]
        n = len(ids)
        assert arrays["inputs"][row].tolist() == ids + [PAD_ID] * (16 - n)
        assert arrays["segment_ids"][row].tolist() == [1] * n + [0] * (16 - n)
        assert arrays["positions"][row].tolist() == list(range(n)) + [0] * (16 - n)
    assert stats == TaskStats(examples=2, truncated=0, dropped_tokens=0)


@pytest.mark.parametrize("label", [2, -1, 1.0, "1", None])
def test_classification_label_outside_classes_names_record_value_and_classes(tokenizer, label):
    message = f"Record 1: label {label!r} is not one of the 2 declared classes 0..1; fix the"
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        encode_classification(tokenizer, ["a dog", "the cat"], [0, label], 2, seq_len=8)


def test_truncation_keeps_eos_and_is_counted(tokenizer):
    texts = ["the old man follows a small tree.", "a dog"]
    long_ids = tokenizer.encode(texts[0])
    arrays, stats = encode_classification(tokenizer, texts, [0, 1], 2, seq_len=6)
    assert arrays["inputs"][0].tolist() == [BOS_ID, *long_ids[:4], EOS_ID]
    assert arrays["segment_ids"][0].tolist() == [1] * 6
    assert stats == TaskStats(examples=2, truncated=1, dropped_tokens=len(long_ids) - 4)


def test_no_truncate_error_names_record_length_and_fix(tokenizer):
    texts = ["a dog", "the old man follows a small tree."]
    n = len(tokenizer.encode(texts[1])) + 2
    message = (
        f"Record 1 has {n} tokens with BOS and EOS but seq_len=6; turn truncation on "
        "(truncate=True) or raise data.seq_len."
    )
    with pytest.raises(ValueError) as error:
        encode_classification(tokenizer, texts, [0, 1], 2, seq_len=6, truncate=False)
    assert str(error.value) == message


def test_regression_takes_one_or_many_numbers_per_record(tokenizer):
    arrays, _ = encode_regression(tokenizer, ["a dog", "the cat"], [[0.5, -2.0], (1, 3.25)], 8)
    assert arrays["target"].dtype == np.float32
    assert arrays["target"].tolist() == [[0.5, -2.0], [1.0, 3.25]]
    arrays, _ = encode_regression(tokenizer, ["a dog", "the cat"], [0.5, np.float32(2)], 8)
    assert arrays["target"].tolist() == [[0.5], [2.0]]


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (
            [1.0, "2.5"],
            "Record 1: target '2.5' is not a finite number or a non-empty sequence of finite "
            "numbers.",
        ),
        (
            [[1.0], [float("nan")]],
            "Record 1: target [nan] is not a finite number or a non-empty sequence of finite "
            "numbers.",
        ),
        (
            [[1.0, 2.0], [3.0]],
            "Record 1 has 1 targets but record 0 has 2; every record needs the same number of "
            "targets.",
        ),
    ],
)
def test_regression_bad_targets_name_the_record(tokenizer, targets, message):
    with pytest.raises(ValueError) as error:
        encode_regression(tokenizer, ["a dog", "the cat"], targets, 8)
    assert str(error.value) == message


def test_token_labels_go_to_first_piece_of_each_word(tokenizer):
    words = ["the", "cat", "sees", RARE_WORD, "."]
    word_tags = [0, 1, 2, 3, 0]
    assert len(tokenizer.encode(" " + RARE_WORD)) >= 2
    arrays, stats = encode_token_labels(tokenizer, [words], [word_tags], 4, seq_len=32)
    ids, tags, weights = arrays["inputs"][0], arrays["tags"][0], arrays["tag_weights"][0]
    assert tags.dtype == np.int32 and weights.dtype == np.float32
    first = np.flatnonzero(weights)
    assert tags[first].tolist() == word_tags
    assert (tags[weights == 0] == IGNORE_TAG).all()
    # Each word spans from its first piece to the next word's; EOS ends the last one.
    ends = [*first[1:], int(np.flatnonzero(ids == EOS_ID)[0])]
    spans = [tokenizer.decode(ids[a:b]) for a, b in zip(first, ends, strict=True)]
    assert spans == ["the", " cat", " sees", " " + RARE_WORD, " ."]
    rare = first[3]
    assert ends[3] - rare >= 2 and weights[rare + 1 : ends[3]].sum() == 0
    assert tokenizer.decode(ids) == "the cat sees " + RARE_WORD + " ."
    assert stats.truncated == 0


def test_token_labels_truncated_keep_tags_of_words_that_still_start(tokenizer):
    words, word_tags = ["the", "cat", "sees", RARE_WORD], [1, 1, 1, 2]
    arrays, stats = encode_token_labels(tokenizer, [words], [word_tags], 3, seq_len=5)
    assert arrays["inputs"][0, -1] == EOS_ID and arrays["tags"][0, -1] == IGNORE_TAG
    assert arrays["tags"][0].tolist() == [IGNORE_TAG, 1, 1, 1, IGNORE_TAG]
    assert stats.truncated == 1


def test_token_label_mismatches_name_the_record(tokenizer):
    with pytest.raises(ValueError) as error:
        encode_token_labels(tokenizer, [["a"], ["a", "dog"]], [[0], [0]], 2, seq_len=8)
    assert str(error.value) == "Record 1 has 2 tokens but 1 tags; give one tag per token."
    with pytest.raises(ValueError) as error:
        encode_token_labels(tokenizer, [["a", "dog"]], [[0, 5]], 2, seq_len=8)
    assert str(error.value) == (
        "Record 0, token 1: tag 5 is not one of the 2 declared tags 0..1; fix the record or "
        "change num_tags."
    )
    with pytest.raises(ValueError) as error:
        encode_token_labels(tokenizer, [["a"]], [[0], [1]], 2, seq_len=8)
    assert str(error.value) == "Got 1 token lists but 2 tag lists; pass one per record."


def test_text_to_text_weights_exactly_answer_and_eos(tokenizer):
    inputs, answers = ["the cat sees", "a dog"], ["the ball.", "likes the river."]
    arrays, stats = encode_text_to_text(tokenizer, inputs, answers, seq_len=24)
    assert sorted(arrays) == ["inputs", "positions", "segment_ids", "targets", "weights"]
    for row, (text, answer) in enumerate(zip(inputs, answers, strict=True)):
        prompt, reply = tokenizer.encode(text + "\n"), tokenizer.encode(answer)
        full = [BOS_ID, *prompt, *reply, EOS_ID]
        n = len(full) - 1
        assert arrays["inputs"][row].tolist() == full[:-1] + [PAD_ID] * (24 - n)
        assert arrays["targets"][row, : n - 1].tolist() == arrays["inputs"][row, 1:n].tolist()
        assert arrays["targets"][row].tolist() == full[1:] + [PAD_ID] * (24 - n)
        weighted = np.flatnonzero(arrays["weights"][row])
        assert weighted.tolist() == list(range(len(prompt), n))
        assert arrays["targets"][row, weighted].tolist() == [*reply, EOS_ID]
        assert arrays["segment_ids"][row].tolist() == [1] * n + [0] * (24 - n)
        assert arrays["positions"][row].tolist() == list(range(n)) + [0] * (24 - n)
    assert stats == TaskStats(examples=2, truncated=0, dropped_tokens=0)


def test_text_to_text_prompt_tokens_do_not_move_the_weights(tokenizer):
    candidates = [" ".join(p) for p in itertools.product(SUBJECTS, VERBS)]
    by_length = {}
    for text in candidates:
        by_length.setdefault(len(tokenizer.encode(text + "\n")), []).append(text)
    same = next(texts for texts in by_length.values() if len(texts) >= 2)
    arrays, _ = encode_text_to_text(tokenizer, same[:2], ["the ball."] * 2, seq_len=24)
    assert arrays["inputs"][0].tolist() != arrays["inputs"][1].tolist()
    assert arrays["weights"][0].tolist() == arrays["weights"][1].tolist()


def test_text_to_text_truncates_prompt_left_then_answer_right(tokenizer):
    prompt = tokenizer.encode("the old man follows\n")
    reply = tokenizer.encode("a small tree.")
    seq_len = len(reply) + 3  # room for BOS, two prompt tokens, the answer and EOS
    arrays, stats = encode_text_to_text(
        tokenizer, ["the old man follows"], ["a small tree."], seq_len
    )
    assert arrays["inputs"][0].tolist() == [BOS_ID, *prompt[-2:], *reply]
    assert arrays["targets"][0, -1] == EOS_ID
    assert stats == TaskStats(1, 1, len(prompt) - 2, 0)

    arrays, stats = encode_text_to_text(tokenizer, ["the old man"], ["a small tree."], seq_len=3)
    assert arrays["inputs"][0].tolist() == [BOS_ID, *reply[:2]]
    assert arrays["targets"][0].tolist() == reply[:3]  # a cut answer ends without EOS
    assert arrays["weights"][0].tolist() == [1.0, 1.0, 1.0]
    n_prompt = len(tokenizer.encode("the old man\n"))
    assert stats == TaskStats(1, 1, n_prompt + len(reply) - 2, len(reply) - 2)


def test_text_to_text_no_truncate_error_names_lengths(tokenizer):
    prompt = tokenizer.encode("the cat\n")
    reply = tokenizer.encode("sees the ball.")
    total = len(prompt) + len(reply) + 2
    with pytest.raises(ValueError) as error:
        encode_text_to_text(tokenizer, ["the cat"], ["sees the ball."], seq_len=4, truncate=False)
    assert str(error.value) == (
        f"Record 0 has {len(prompt)} prompt and {len(reply)} target tokens ({total} with BOS and "
        "EOS) but a row holds seq_len + 1 = 5; turn truncation on (truncate=True) or raise "
        "data.seq_len."
    )


def test_text_to_text_template_needs_input_slot(tokenizer):
    with pytest.raises(ValueError) as error:
        encode_text_to_text(tokenizer, ["a"], ["b"], seq_len=8, template="Q: A:")
    assert str(error.value) == "template 'Q: A:' has no '{input}' to put the input in."


ROW_SHAPE_EXAMPLES = {
    "classification": (["the cat sees the ball.", "a dog"], [1, 0]),
    "regression": (["the cat sees the ball.", "a dog"], [[0.5, 2.0], [1.0, -1.0]]),
    "token_labels": ([["the", "cat", "sees"], ["a", "dog"]], [[0, 1, 0], [0, 1]]),
    "text_to_text": (["the cat sees", "a dog"], ["the ball.", "likes"]),
    "chat": (
        [[{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "a dog"}]],
        [None],
    ),
}


@pytest.mark.parametrize("name", sorted(ROW_SHAPE_EXAMPLES))
def test_row_shapes_are_the_keys_shapes_and_dtypes_encode_returns(tokenizer, name):
    """`lm plan --gpu/--topology` compiles a fine-tune step from `row_shapes` alone."""
    from lm.config import load_config
    from lm.tasks import task_for

    labels = {"classification": "neg,pos", "token_labels": "O,B"}.get(name)
    overrides = [f"finetune.task={name}", "data.seq_len=16"]
    overrides += [f"finetune.labels={labels}"] if labels else []
    overrides += ["finetune.label_column=a,b"] if name == "regression" else []
    cfg = load_config(None, overrides)
    task = task_for(cfg)
    arrays, _ = task.encode(cfg, tokenizer, ROW_SHAPE_EXAMPLES[name])
    found = {k: (a.shape[1:], a.dtype) for k, a in arrays.items()}
    assert found == {k: (shape, np.dtype(dt)) for k, (shape, dt) in task.row_shapes(cfg).items()}

"""Named TFDS datasets read without TensorFlow: mocked ones, a real tiny build, and every error."""

import json

import pytest
import tensorflow_datasets as tfds

from lm.data import sources
from lm.data.sources import load_documents
from lm.data.tfds_named import tfds_documents


class LmTinyLabelled(tfds.core.GeneratorBasedBuilder):
    """A registered dataset with 'train' and 'test' splits only, prepared offline in tests."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # no code folder to look up metadata in

    def _info(self) -> tfds.core.DatasetInfo:
        features = {"text": tfds.features.Text(), "label": tfds.features.ClassLabel(num_classes=2)}
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict(features), disable_shuffling=True
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(4), "test": self._generate_examples(2)}

    def _generate_examples(self, count: int):
        for i in range(count):
            yield i, {"text": f"doc {i} ünïcödé", "label": i % 2}


def _prepare_tiny(data_dir) -> str:
    builder = tfds.builder("lm_tiny_labelled", data_dir=str(data_dir), file_format="array_record")
    with sources._quiet_tfds():
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
    return str(builder.data_dir)


MOCKED_TEXT = [
    ("lm1b", "text"),
    ("imdb_reviews", "text"),
    ("glue/sst2", "sentence"),
    ("glue/stsb", "sentence1"),
]


@pytest.mark.parametrize(("name", "key"), MOCKED_TEXT, ids=[n for n, _ in MOCKED_TEXT])
def test_mocked_datasets_read_their_text_feature_as_str(tmp_path, name, key):
    with tfds.testing.mock_data(num_examples=3):
        splits = tfds_documents(name, str(tmp_path), key)
        for texts in splits.values():
            assert len(texts) == 3 and all(isinstance(t, str) for t in texts)


def test_tfds_source_through_load_documents(tmp_path):
    with tfds.testing.mock_data(num_examples=4):
        splits = load_documents("tfds:lm1b", str(tmp_path), 0.05)
        assert set(splits) == {"train", "validation"}
        for docs in splits.values():
            assert len(docs) == 4 and all(isinstance(d, str) for d in docs)


def test_default_text_key_is_the_only_text_feature(tmp_path):
    with tfds.testing.mock_data(num_examples=2):
        splits = load_documents("tfds:glue/sst2", str(tmp_path), 0.05)
        assert all(isinstance(d, str) for d in splits["train"])
        with pytest.raises(ValueError) as error:
            load_documents("tfds:glue/stsb", str(tmp_path), 0.05)
    assert str(error.value) == (
        "TFDS dataset 'glue/stsb' has 2 text features, so one must be chosen; "
        "available: idx, label, sentence1, sentence2. Set data.text_key=..."
    )


def test_prepared_array_record_reads_back_without_tensorflow(tmp_path):
    _prepare_tiny(tmp_path)
    texts = tfds_documents("lm_tiny_labelled", str(tmp_path))["train"]
    assert texts[:2] == ["doc 0 ünïcödé", "doc 1 ünïcödé"]


def test_validation_falls_back_to_the_test_split(tmp_path):
    _prepare_tiny(tmp_path)
    splits = load_documents("tfds:lm_tiny_labelled", str(tmp_path), 0.05)
    assert list(splits["train"]) == [f"doc {i} ünïcödé" for i in range(4)]
    assert list(splits["validation"]) == [f"doc {i} ünïcödé" for i in range(2)]


def test_unknown_name_suggests_the_closest(tmp_path):
    with pytest.raises(ValueError) as error:
        tfds_documents("lm1bb", str(tmp_path))
    assert str(error.value) == "Unknown TFDS dataset 'lm1bb'; did you mean 'lm1b'?"
    # glue registers only once imported, yet is still suggested.
    with pytest.raises(ValueError) as error:
        tfds_documents("gleu/sst2", str(tmp_path))
    assert str(error.value) == "Unknown TFDS dataset 'gleu'; did you mean 'glue'?"


def test_unknown_config_suggests_the_closest(tmp_path):
    with pytest.raises(ValueError) as error:
        tfds_documents("glue/sst3", str(tmp_path))
    assert str(error.value) == "TFDS dataset 'glue' has no config 'sst3'; did you mean 'glue/sst2'?"


def test_wrong_feature_key_lists_the_available_keys(tmp_path):
    with tfds.testing.mock_data(num_examples=1):
        with pytest.raises(ValueError) as missing:
            tfds_documents("imdb_reviews", str(tmp_path), text_key="txt")
        with pytest.raises(ValueError) as not_text:
            tfds_documents("imdb_reviews", str(tmp_path), text_key="label")
    assert str(missing.value) == (
        "Feature 'txt' is not in imdb_reviews; available: label, text. Set data.text_key=..."
    )
    assert str(not_text.value) == (
        "Feature 'label' of imdb_reviews is ClassLabel, not text; text features: text. "
        "Set data.text_key=..."
    )


def test_unprepared_dataset_names_the_dir_and_how_to_build_it(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_documents("tfds:lm1b", str(tmp_path), 0.05)
    assert str(error.value) == (
        f"TFDS dataset 'lm1b' is not prepared in {tmp_path}/lm1b/1.1.0 and downloads are off; "
        f"on a machine with network run `tfds build lm1b --data_dir {tmp_path} "
        '--file_format array_record` (or python -c "import tensorflow_datasets as tfds; '
        f"tfds.builder('lm1b', data_dir='{tmp_path}', file_format='array_record')"
        f'.download_and_prepare()") and copy {tmp_path} here.'
    )


def test_tfrecord_only_build_asks_for_the_tf_extra(tmp_path):
    version_dir = _prepare_tiny(tmp_path)
    # Relabel the build as tfrecord: writing real tfrecords would need TensorFlow.
    info_path = f"{version_dir}/dataset_info.json"
    with open(info_path) as f:
        info = json.load(f)
    info["fileFormat"] = "tfrecord"
    with open(info_path, "w") as f:
        json.dump(info, f)
    with pytest.raises(ValueError) as error:
        tfds_documents("lm_tiny_labelled", str(tmp_path))
    assert str(error.value) == (
        f"TFDS dataset 'lm_tiny_labelled' in {version_dir} is prepared as tfrecord only, which "
        "needs TensorFlow: install the optional extra (pip install 'lm[tf]') or re-prepare it "
        "with file_format='array_record'."
    )


def test_tfds_source_keeps_a_gcs_data_dir_intact(monkeypatch):
    seen = {}
    monkeypatch.setattr(
        sources, "tfds_documents", lambda name, data_dir, key: seen.update(dir=data_dir) or {}
    )
    load_documents("tfds:lm1b", "gs://bucket/tfds", 0.05)
    assert seen["dir"] == "gs://bucket/tfds"
    load_documents("tfds:lm1b", "~/tfds", 0.05)
    assert not seen["dir"].startswith("~")

"""GLUE / CLUE readers on small files written in the real formats."""
import pytest

from ms_nlp_compress.data.glue import (
    MNLI_LABELS, TASKS, Example, get_task, read_chinese_sentiment, read_cola, read_mnli, read_mrpc, read_qnli,
    read_qqp, read_rte, read_sst2, read_stsb,
)
from ms_nlp_compress.errors import DataError


def write(tmp_path, name, rows, newline="\n", prefix=b""):
    path = tmp_path / name
    path.write_bytes(prefix + newline.join("\t".join(row) for row in rows).encode("utf-8") + newline.encode())
    return path


def test_cola_train_has_no_header_and_test_has_one(tmp_path):
    train = write(tmp_path, "train.tsv", [["gj04", "1", "", "Our friends won't buy this analysis."],
                                          ["gj04", "0", "*", "They drank the pub."]])
    assert read_cola(train) == [Example("train-1", "Our friends won't buy this analysis.", None, 1),
                                Example("train-2", "They drank the pub.", None, 0)]
    test = write(tmp_path, "test.tsv", [["index", "sentence"], ["0", "Bill whistled past the house."]])
    assert read_cola(test) == [Example("test-0", "Bill whistled past the house.", None, None)]


def test_sst2_train_and_unlabeled_test(tmp_path):
    train = write(tmp_path, "train.tsv", [["sentence", "label"], ["hide new secretions ", "0"],
                                          ["a \"quoted\" gem", "1"]])
    examples = read_sst2(train)
    assert [(e.text_a, e.label) for e in examples] == [("hide new secretions ", 0), ('a "quoted" gem', 1)]
    test = write(tmp_path, "test.tsv", [["index", "sentence"], ["0", "uneasy mishmash"]])
    assert read_sst2(test)[0].label is None


def test_mrpc_with_byte_order_mark_and_crlf(tmp_path):
    path = write(tmp_path, "train.tsv", [["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
                                         ["1", "702876", "702977", "Amrozi accused his brother.", "Referring to him."],
                                         ["0", "2108705", "2108831", "Yucaipa owned Dominick's.",
                                          "Yucaipa bought it."]],
                 newline="\r\n", prefix=b"\xef\xbb\xbf")
    examples = read_mrpc(path)
    assert [(e.text_a, e.text_b, e.label) for e in examples] == [
        ("Amrozi accused his brother.", "Referring to him.", 1), ("Yucaipa owned Dominick's.", "Yucaipa bought it.", 0)]


STSB_HEADER = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
               "score"]


def test_stsb_scores_are_floats(tmp_path):
    path = write(tmp_path, "dev.tsv", [STSB_HEADER,
                                       ["0", "main-captions", "MSRvid", "2012test", "0000", "none", "none",
                                        "A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.",
                                        "5.000"],
                                       ["1", "x", "y", "2014", "7", "vader", "vader", "Single sentence.", "", "-1.25"]])
    examples = read_stsb(path)
    assert examples[0] == Example("dev-0", "A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.",
                                  5.0)
    assert examples[1].text_b is None and examples[1].label == -1.25  # empty sentence2 = single sentence


def test_qqp_and_its_test_file(tmp_path):
    path = write(tmp_path, "train.tsv", [["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
                                         ["133273", "213221", "213222", "How do I learn Python?",
                                          "What is the best way to learn Python?", "1"]])
    assert read_qqp(path)[0] == Example("train-133273", "How do I learn Python?",
                                        "What is the best way to learn Python?", 1)
    test = write(tmp_path, "test.tsv", [["id", "question1", "question2"], ["0", "Why?", "Why not?"]])
    assert read_qqp(test)[0].label is None


MNLI_DEV_HEADER = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                   "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "label2", "label3",
                   "label4", "label5", "gold_label"]


def mnli_row(index, premise, hypothesis, gold, annotators=5):
    return [str(index), "1", f"{index}e", "fiction", "( ( x ) )", "( ( y ) )", "(ROOT x)", "(ROOT y)", premise,
            hypothesis] + [gold] * annotators + [gold]


def test_mnli_uses_reference_label_order_and_last_column(tmp_path):
    assert MNLI_LABELS == ("contradiction", "entailment", "neutral")
    dev = write(tmp_path, "dev_matched.tsv", [MNLI_DEV_HEADER, mnli_row(0, "The cat sat.", "A cat sat.", "entailment"),
                                              mnli_row(1, "It rained.", "It was dry.", "contradiction"),
                                              mnli_row(2, "He left.", "He was sad.", "neutral")])
    assert [(e.text_a, e.text_b, e.label) for e in read_mnli(dev)] == [
        ("The cat sat.", "A cat sat.", 1), ("It rained.", "It was dry.", 0), ("He left.", "He was sad.", 2)]
    train_header = MNLI_DEV_HEADER[:11] + ["gold_label"]  # train has one annotator column
    train = write(tmp_path, "train.tsv", [train_header, mnli_row(0, "P.", "H.", "neutral", annotators=1)])
    assert read_mnli(train)[0].label == 2
    assert get_task("mnli").dev_files == ("dev_matched.tsv", "dev_mismatched.tsv")


def test_qnli_and_rte(tmp_path):
    qnli = write(tmp_path, "qnli.tsv", [["index", "question", "sentence", "label"],
                                        ["0", "What came into force?", "The treaty came into force.", "entailment"],
                                        ["1", "Who?", "Nobody knows.", "not_entailment"]])
    assert [e.label for e in read_qnli(qnli)] == [0, 1]
    rte = write(tmp_path, "rte.tsv", [["index", "sentence1", "sentence2", "label"],
                                      ["0", "Dana Reeve died.", "Christopher Reeve had an accident.",
                                       "not_entailment"]])
    assert read_rte(rte)[0] == Example("rte-0", "Dana Reeve died.", "Christopher Reeve had an accident.", 1)


def test_chinese_sentiment_accepts_both_headers(tmp_path):
    clue = write(tmp_path, "clue.tsv", [["label", "text_a"], ["1", "酒店很干净，服务很好"], ["0", "电池不耐用"]])
    assert [(e.text_a, e.label) for e in read_chinese_sentiment(clue)] == [("酒店很干净，服务很好", 1), ("电池不耐用", 0)]
    ours = write(tmp_path, "ours.tsv", [["sentence", "label"], ["电池不耐用", "0"]])
    assert read_chinese_sentiment(ours)[0].label == 0


@pytest.mark.parametrize("bad_row, reason", [
    (["a sentence", "1", "extra"], "3 columns, expected 2"),
    (["a sentence", "positive"], "unknown label 'positive'"),
    ([""], "1 columns, expected 2"),
])
def test_malformed_rows_name_file_and_line(tmp_path, bad_row, reason):
    path = write(tmp_path, "train.tsv", [["sentence", "label"], ["fine", "1"], bad_row, ["also fine", "0"]])
    with pytest.raises(DataError) as caught:
        read_sst2(path)
    assert f"{path}:3: {reason}" in str(caught.value)
    examples = read_sst2(path, skip_malformed=True)
    assert [e.text_a for e in examples] == ["fine", "also fine"]
    assert examples.skipped == 1 and examples.skipped_lines[0][0] == 3


def test_non_numeric_score_and_invalid_utf8(tmp_path):
    row = ["0", "g", "f", "y", "0", "s", "s", "A.", "B."]
    path = write(tmp_path, "train.tsv", [STSB_HEADER, row + ["high"], row + ["1.5"]])
    with pytest.raises(DataError, match=r"train.tsv:2: score 'high' is not a number"):
        read_stsb(path)
    path = tmp_path / "bad_utf8.tsv"
    path.write_bytes(b"sentence\tlabel\ngood\t1\nbad \xff\xfe bytes\t0\n")
    with pytest.raises(DataError, match=r"bad_utf8.tsv:3: invalid UTF-8"):
        read_sst2(path)
    skipped = read_sst2(path, skip_malformed=True)
    assert len(skipped) == 1 and skipped.skipped == 1


def test_wrong_header_and_missing_file(tmp_path):
    path = write(tmp_path, "train.tsv", [["text", "polarity"], ["x", "1"]])
    with pytest.raises(DataError, match=r"train.tsv:1: header .* is not a SST-2 header"):
        read_sst2(path)
    with pytest.raises(DataError, match="file not found"):
        read_qqp(tmp_path / "missing.tsv")


def test_task_registry():
    assert set(TASKS) == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "chinese_sentiment"}
    assert get_task("SST-2") is TASKS["sst2"] and get_task("STS-B").is_regression
    assert TASKS["stsb"].num_labels == 1 and TASKS["mnli"].num_labels == 3
    assert TASKS["qnli"].labels == ("entailment", "not_entailment")
    assert TASKS["cola"].metric == "matthews_corrcoef"
    with pytest.raises(DataError, match="unknown task"):
        get_task("wnli")

import pytest

from mner_bench.data import SPLIT_FILES, parse_conll, read_conll, sample_shots, twitter_loader
from mner_bench.errors import DataError, MnerBenchError

from .conftest import FIXTURE_CONLL, requires_real_data


def test_parse_reads_tweets_and_maps_other_to_misc():
    tweets = parse_conll(FIXTURE_CONLL, "f.txt")
    assert [t.imgid for t in tweets] == ["1", "2", "3", "4"]
    assert tweets[0].tokens[3:5] == ["George", "Zimmerman"]
    assert tweets[1].tags == ["B-ORG", "O", "B-MISC", "O"]
    assert sum(len(t.tokens) for t in tweets) == 8 + 4 + 7 + 3


def test_windows_line_endings_and_bom_are_accepted():
    crlf = "\ufeff" + FIXTURE_CONLL.replace("\n", "\r\n")
    assert [t.tags for t in parse_conll(crlf)] == [t.tags for t in parse_conll(FIXTURE_CONLL)]


def test_last_tweet_without_blank_line_is_kept():
    tweets = parse_conll("IMGID:1\na\tO\n\nIMGID:2\nb\tB-PER")
    assert [t.tokens for t in tweets] == [["a"], ["b"]]


@pytest.mark.parametrize(
    "text, line, needle",
    [
        ("IMGID:1\nno-tab-here\n", 2, "no tab"),
        ("IMGID:1\nx\tB-FOO\n", 2, "unknown tag 'B-FOO'"),
        ("IMGID:1\nx\tO\ny\tb-per\n", 3, "did you mean 'B-PER'"),
        ("IMGID:1\nx\tS-PER\n", 2, "IOBES"),
        ("IMGID:1\nx\tE-LOC\n", 2, "IOBES"),
        ("x\tO\n", 1, "outside a tweet"),
        ("IMGID:1\n\nIMGID:2\nx\tO\n", 1, "has no tokens"),
        ("IMGID:1\nx\tO\tO\n", 2, "more"),
        ("IMGID:1\n\tO\n", 2, "empty token"),
    ],
)
def test_malformed_lines_name_file_and_line(text, line, needle):
    with pytest.raises(DataError) as err:
        parse_conll(text, "bad.txt")
    assert f"bad.txt:{line}:" in str(err.value)
    assert needle in str(err.value)


@pytest.mark.parametrize("text", ["", "\n\n", "IMGID:1\nIMGID:2\n"])
def test_empty_files_and_files_of_only_imgid_lines_fail(text):
    with pytest.raises(DataError, match="bad.txt"):
        parse_conll(text, "bad.txt")


def test_non_utf8_names_the_line(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes(b"IMGID:1\nok\tO\ncaf\xe9\tO\n")
    with pytest.raises(DataError, match=r"latin1.txt:3: not valid UTF-8"):
        read_conll(p)


def test_missing_file_without_download_says_where_to_put_it(tmp_path):
    class Cfg:
        data_dir = str(tmp_path)
        download = False

    with pytest.raises(DataError, match="Put the file at"):
        twitter_loader("twitter2015")("train", Cfg())


def test_shots_are_deterministic_and_checked():
    tweets = [t for _ in range(5) for t in parse_conll(FIXTURE_CONLL)]
    for i, t in enumerate(tweets):
        t.imgid = str(i)
    a = [t.imgid for t in sample_shots(tweets, 7, seed=3)]
    b = [t.imgid for t in sample_shots(tweets, 7, seed=3)]
    c = [t.imgid for t in sample_shots(tweets, 7, seed=4)]
    assert a == b and a != c and len(set(a)) == 7
    with pytest.raises(MnerBenchError, match="larger than the training set"):
        sample_shots(tweets, 21, seed=1)
    with pytest.raises(MnerBenchError, match="positive"):
        sample_shots(tweets, 0, seed=1)


@requires_real_data
@pytest.mark.parametrize(
    "folder, counts",
    [("twitter2015", {"train": 4000, "dev": 1000, "test": 3257}),
     ("twitter2017", {"train": 3373, "dev": 723, "test": 723})],
)
def test_real_data_sets_have_the_published_tweet_counts(folder, counts):
    load = twitter_loader(folder)
    assert set(counts) == set(SPLIT_FILES)
    for split, n in counts.items():
        assert len(load(split)) == n

"""`data import` on bad files: only strings become text, every row is kept or rejected with
its reason (and the rejects are strict JSON), a bad line spoils only itself, and a failed import
points at a rejects file that exists."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from distillscale.data.build import MAX_TEXT_CHARS, read_jsonl
from tests.reliability.conftest import TAXONOMY, import_accounting

pytestmark = pytest.mark.reliability

GOOD = [f"Acme {i} files for Chapter 11 protection after talks fail" for i in range(12)]


def _good_jsonl() -> list[str]:
    return [json.dumps({"text": t, "label": "bankruptcy"}) for t in GOOD]


def _good_csv() -> str:
    return "".join(f"{t},bankruptcy\n" for t in GOOD)


# (case, file name, bytes, data rows in the file, reason fragments expected among rejects)
JSONL_BAD = [
    ("null-text", {"text": None, "label": "bankruptcy"}, "text is missing (null), not a string"),
    ("number-text", {"text": 12345, "label": "bankruptcy"}, "text is a number (12345)"),
    ("zero-text", {"text": 0, "label": "bankruptcy"}, "text is a number (0)"),
    ("list-text", {"text": ["a", "list"], "label": "bankruptcy"}, "text is a list"),
    ("object-text", {"text": {"k": "v"}, "label": "bankruptcy"}, "text is an object"),
    ("bool-text", {"text": True, "label": "bankruptcy"}, "text is a boolean (true)"),
    ("missing-text", {"label": "bankruptcy"}, "text is missing (null)"),
    ("null-label", {"text": "Beta Corp enters administration", "label": None},
     "label is missing (null)"),
    ("number-label", {"text": "Beta Corp enters administration", "label": 7},
     "label is a number (7)"),
    ("unknown-gold", {"text": "Beta Corp enters administration", "label": "bankruptcy",
                      "gold_label": "moon_landing"}, "unknown gold_label 'moon_landing'"),
    ("number-gold", {"text": "Beta Corp enters administration", "label": "bankruptcy",
                     "gold_label": 3}, "gold_label is a number (3)"),
    ("bool-id", {"id": True, "text": "Beta Corp enters administration", "label": "bankruptcy"},
     "id is a boolean"),
    ("list-id", {"id": [1], "text": "Beta Corp enters administration", "label": "bankruptcy"},
     "id is a list"),
    ("long-text", {"text": "word " * (MAX_TEXT_CHARS // 4), "label": "bankruptcy"},
     f"text longer than {MAX_TEXT_CHARS} characters"),
    ("control-chars", {"text": "Beta Corp \x07 enters administration", "label": "bankruptcy"},
     "control characters in text"),
    ("whitespace-text", {"text": "   ", "label": "bankruptcy"}, "empty text"),
]


def _import(cli, src, out, *extra):
    return cli("data", "import", "--input", src, "--domain", TAXONOMY, "--out", out, *extra)


def _account(ledger, case, out, rows_in) -> dict:
    acc = import_accounting(out)
    ledger.rows(rows_in - acc["kept"] - acc["rejected"])
    if acc["manifest"] is not None:
        m = acc["manifest"]
        assert m["rows_in"] == rows_in and m["rows_kept"] == acc["kept"]
        assert m["rows_rejected"] == acc["rejected"]
    return acc


@pytest.mark.parametrize("case,row,reason", JSONL_BAD, ids=[c[0] for c in JSONL_BAD])
def test_jsonl_bad_value_is_a_reject_with_its_reason(cli, ledger, tmp_path, case, row, reason):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(_good_jsonl() + [json.dumps(row)]) + "\n")
    out = tmp_path / "ds"
    r = _import(cli, src, out)
    assert r.rc == 0, r.err
    acc = _account(ledger, case, out, 13)
    assert acc["rejected"] == 1
    rej = read_jsonl(out / "rejects.jsonl")[0]
    assert reason in rej["reason"] and rej["line"] == 13
    texts = {x["text"] for s in ("train", "val", "test") for x in read_jsonl(out / f"{s}.jsonl")}
    assert texts == set(GOOD)  # nothing but the good strings became headlines


def test_user_ids_are_kept_and_duplicates_rejected(cli, ledger, tmp_path):
    src = tmp_path / "in.jsonl"
    rows = [{"id": f"u{i}", "text": t, "label": "bankruptcy"} for i, t in enumerate(GOOD)]
    rows.append({"id": "u3", "text": "Beta Corp enters administration", "label": "bankruptcy"})
    rows.append({"id": 77, "text": "Gamma Corp enters administration", "label": "bankruptcy"})
    src.write_text("\n".join(map(json.dumps, rows)) + "\n")
    out = tmp_path / "ds"
    assert _import(cli, src, out).rc == 0
    _account(ledger, "ids", out, 14)
    kept = {x["id"] for s in ("train", "val", "test") for x in read_jsonl(out / f"{s}.jsonl")}
    assert kept == {f"u{i}" for i in range(12)} | {"77"}
    (rej,) = read_jsonl(out / "rejects.jsonl")
    assert rej["reason"].startswith("id already used (id u3")


def test_gold_label_alias_is_validated_like_label(cli, ledger, tmp_path):
    src = tmp_path / "in.jsonl"
    rows = [{"text": t, "label": "bankruptcy", "gold_label": "buyback"} for t in GOOD]
    src.write_text("\n".join(map(json.dumps, rows)) + "\n")
    out = tmp_path / "ds"
    assert _import(cli, src, out).rc == 0
    _account(ledger, "gold-alias", out, 12)
    golds = {x["gold_label"] for s in ("train", "val", "test") for x in read_jsonl(out / f"{s}.jsonl")}
    assert golds == {"share_buyback"}


def test_jsonl_bom_keeps_the_first_row(cli, ledger, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + ("\n".join(_good_jsonl()) + "\n").encode())
    out = tmp_path / "ds"
    assert _import(cli, src, out).rc == 0
    acc = _account(ledger, "jsonl-bom", out, 12)
    assert acc["kept"] == 12 and acc["rejected"] == 0


@pytest.mark.parametrize("case,line,reason", [
    ("array-line", "[1, 2]", "malformed line 13: TypeError"),
    ("scalar-line", "42", "malformed line 13: TypeError"),
    ("broken-json", '{"text": "x", ', "malformed line 13: JSONDecodeError"),
    ("binary-line", "\udcff\udcfe", "malformed line 13"),
], ids=lambda v: v if isinstance(v, str) and v.endswith("line") or v == "broken-json" else None)
def test_jsonl_malformed_line_is_one_reject(cli, ledger, tmp_path, case, line, reason):
    src = tmp_path / "in.jsonl"
    src.write_bytes(("\n".join(_good_jsonl()) + "\n").encode()
                    + line.encode("utf-8", "surrogateescape") + b"\n")
    out = tmp_path / "ds"
    assert _import(cli, src, out).rc == 0
    acc = _account(ledger, case, out, 13)
    assert acc["rejected"] == 1
    assert read_jsonl(out / "rejects.jsonl")[0]["reason"].startswith(reason)


# (case, CSV text after the good rows, data rows added, reason fragment)
CSV_BAD = [
    ("unterminated-quote", '"Beta Corp, never closed,bankruptcy\n', 1, "malformed CSV line 14"),
    ("quote-in-middle", 'Delta rises,bankruptcy\n"Beta" Corp,bankruptcy\n', 2,
     "malformed CSV line 15"),
    ("ragged-row", "Beta Corp, Inc enters administration,bankruptcy\n", 1,
     "ragged CSV line 14: 3 fields, the header has 2"),
    ("short-row", "Beta Corp enters administration\n", 1, "ragged CSV line 14: 1 fields"),
    ("binary-bytes", "Beta \udcff\udcfe Corp enters administration,bankruptcy\n", 1,
     "invalid UTF-8 in text"),
    ("nul-byte", "Beta \x00 Corp enters administration,bankruptcy\n", 1,
     "control characters in text"),
    ("empty-text", ",bankruptcy\n", 1, "empty text"),
    ("unknown-label", "Beta Corp enters administration,not_a_class\n", 1,
     "unknown label 'not_a_class'"),
]


@pytest.mark.parametrize("case,tail,n_bad,reason", CSV_BAD, ids=[c[0] for c in CSV_BAD])
def test_csv_bad_line_spoils_only_itself(cli, ledger, tmp_path, case, tail, n_bad, reason):
    src = tmp_path / "in.csv"
    src.write_bytes(("text,label\n" + _good_csv() + tail).encode("utf-8", "surrogateescape"))
    out = tmp_path / "ds"
    r = _import(cli, src, out)
    assert r.rc == 0, r.err
    acc = _account(ledger, case, out, 12 + n_bad)
    assert acc["kept"] >= 12
    assert any(reason in x["reason"] for x in read_jsonl(out / "rejects.jsonl"))


def test_unterminated_quote_keeps_the_rows_after_it(cli, ledger, tmp_path):
    src = tmp_path / "in.csv"
    lines = ["text,label", *[f"{t},bankruptcy" for t in GOOD[:6]], '"Beta Corp never closed,x',
             *[f"{t},bankruptcy" for t in GOOD[6:]]]
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "ds"
    assert _import(cli, src, out).rc == 0
    acc = _account(ledger, "quote-middle-of-file", out, 13)
    assert acc["kept"] == 12 and acc["rejected"] == 1
    assert read_jsonl(out / "rejects.jsonl")[0]["line"] == 8


@pytest.mark.parametrize("delimiter", [";", "\t", "|"], ids=["semicolon", "tab", "pipe"])
def test_csv_delimiter_is_found_from_the_header(cli, ledger, tmp_path, delimiter):
    src = tmp_path / "in.csv"
    src.write_text(f"text{delimiter}label\n"
                   + "".join(f"{t}, again{delimiter}bankruptcy\n" for t in GOOD))
    out = tmp_path / "ds"
    assert _import(cli, src, out).rc == 0
    acc = _account(ledger, f"delimiter-{delimiter!r}", out, 12)
    assert acc["kept"] == 12


def test_csv_bom_and_crlf(cli, ledger, tmp_path):
    src = tmp_path / "in.csv"
    src.write_bytes(b"\xef\xbb\xbf" + ("text,label\r\n" + _good_csv().replace("\n", "\r\n")).encode())
    out = tmp_path / "ds"
    assert _import(cli, src, out).rc == 0
    assert _account(ledger, "csv-bom-crlf", out, 12)["kept"] == 12


def test_csv_without_the_columns_says_what_was_tried(cli, ledger, tmp_path):
    src = tmp_path / "in.csv"
    src.write_text("headline:event\n" + "".join(f"{t}:bankruptcy\n" for t in GOOD))
    r = _import(cli, src, tmp_path / "ds")
    assert r.rc == 2 and len(r.err.strip().splitlines()) == 1
    assert "line 1: the header names no columns 'text' and 'label'" in r.err
    assert "';'" in r.err and "--text-column" in r.err


def test_parquet_list_and_null_values(cli, ledger, tmp_path):
    src = tmp_path / "in.parquet"
    df = pd.DataFrame({"text": [*GOOD, None, float("nan"), "Beta Corp enters administration"],
                       "label": ["bankruptcy"] * 15,
                       "tags": [["x", "y"]] * 15})
    df.to_parquet(src)
    lists = tmp_path / "lists.parquet"
    pd.DataFrame({"text": [["a", "list"]] * 3, "label": ["bankruptcy"] * 3}).to_parquet(lists)
    out = tmp_path / "ds"
    assert _import(cli, src, out).rc == 0
    acc = _account(ledger, "parquet-nulls", out, 15)
    assert acc["kept"] == 13 and acc["rejected"] == 2  # rejects.jsonl parsed strictly
    out2 = tmp_path / "ds2"
    r = _import(cli, lists, out2)
    assert r.rc == 2 and "no valid rows of 3 (text is a list, not a string: 3)" in r.err
    _account(ledger, "parquet-list-text", out2, 3)


def test_no_valid_rows_points_at_a_rejects_file_that_exists(cli, ledger, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"text": i, "label": "bankruptcy"}) for i in range(5)))
    out = tmp_path / "ds"
    r = _import(cli, src, out)
    assert r.rc == 2 and len(r.err.strip().splitlines()) == 1
    named = r.err.strip().rsplit(": ", 1)[1]
    assert named.endswith("rejects.jsonl") and len(read_jsonl(named)) == 5
    _account(ledger, "no-valid-rows", out, 5)


def test_one_huge_headline_is_rejected_quickly(cli, ledger, tmp_path):
    src = tmp_path / "in.jsonl"
    huge = json.dumps({"text": "word " * 2_000_000, "label": "bankruptcy"})
    src.write_text("\n".join(_good_jsonl() + [huge]) + "\n")
    out = tmp_path / "ds"
    assert _import(cli, src, out).rc == 0
    acc = _account(ledger, "10MB-headline", out, 13)
    assert acc["rejected"] == 1
    assert read_jsonl(out / "rejects.jsonl")[0]["reason"].startswith("text longer than")


@pytest.mark.parametrize("case", ["empty-csv", "directory", "txt-extension", "corrupt-parquet",
                                  "missing"])
def test_unreadable_input_is_one_line(cli, tmp_path, case):
    src = {"empty-csv": tmp_path / "e.csv", "directory": tmp_path / "d.csv",
           "txt-extension": tmp_path / "x.txt", "corrupt-parquet": tmp_path / "c.parquet",
           "missing": tmp_path / "none.jsonl"}[case]
    if case == "directory":
        src.mkdir()
    elif case == "corrupt-parquet":
        src.write_bytes(b"PAR1 this is not parquet")
    elif case != "missing":
        src.write_text("" if case == "empty-csv" else "text,label\n")
    r = _import(cli, src, tmp_path / "ds")
    assert r.rc == 2 and r.err.startswith("error: ") and len(r.err.strip().splitlines()) == 1
    assert str(src.name) in r.err


def test_length_histogram_bins_by_quantiles():
    from distillscale.data.card import LENGTH_BINS, length_bin_edges

    edges = length_bin_edges([8, 9, 10, 11, 12] * 50 + [1_500_000])
    assert len(edges) - 1 <= LENGTH_BINS and edges[-1] > 1_500_000

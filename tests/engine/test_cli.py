"""`tallow index add/search/stats` and `tallow rag` on a temporary data directory."""

from __future__ import annotations

import json
import subprocess
import sys

from tallow.cli import main, read_documents


def _files(tmp_path, docs):
    (tmp_path / "a.txt").write_text(docs[0]["text"])
    (tmp_path / "b.md").write_text("# Notes\n\n" + docs[1]["text"])
    with open(tmp_path / "c.jsonl", "w") as f:
        for d in docs[2:5]:
            f.write(json.dumps({"id": d["id"], "title": d["title"], "text": d["text"], "category": d["category"],
                                "timestamp": d["timestamp"], "payload": d["payload"]}) + "\n")
        f.write("\n")
        f.write(json.dumps({"text": docs[5]["text"]}) + "\n")
    return [str(tmp_path / n) for n in ("a.txt", "b.md", "c.jsonl")]


def test_cli_add_search_stats(tmp_path, docs, capsys):
    files = _files(tmp_path, docs)
    parsed = read_documents(files)
    assert [d["id"] for d in parsed] == [files[0], files[1], "doc-2", "doc-3", "doc-4", f"{files[2]}:5"]
    assert parsed[1]["title"] == "b.md"
    data = str(tmp_path / "data")
    run = lambda *a: subprocess.run([sys.executable, "-m", "tallow", *a, "--data-dir", data],  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    add = run("index", "add", *files, "--json", "--no-progress")
    assert add.returncode == 0, add.stderr
    summary = json.loads(add.stdout)
    assert summary["added"] == 6 and summary["chunks"] >= 6
    query = " ".join(docs[3]["text"].split()[:12])
    found = run("index", "search", query, "--k", "3", "--filter", '{"category": "a"}', "--json")
    assert found.returncode == 0, found.stderr
    results = json.loads(found.stdout)
    assert results[0]["doc_id"] == "doc-3" and all(r["category"] == "a" for r in results)

    assert main(["index", "stats", "--data-dir", data, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["documents"] == 6 and st["chunks"] == st["indexed_chunks"]
    assert main(["index", "search", query, "--data-dir", data, "--k", "2"]) == 0
    assert "doc-3" in capsys.readouterr().out
    assert main(["index", "search", query, "--data-dir", data, "--filter", '{"n": {"like": 1}}']) == 2
    assert "like" in capsys.readouterr().err
    assert main(["index", "search", query, "--data-dir", data, "--k", "0"]) == 2
    assert "k must be >= 1" in capsys.readouterr().err
    assert main(["rag", query, "--data-dir", data]) == 0  # no generator: the closest sentences
    out = capsys.readouterr().out
    assert out.startswith("(extractive: no generator set) ") and "sources:" in out
    (tmp_path / "x.pdf").write_text("%PDF")
    assert main(["index", "add", str(tmp_path / "x.pdf"), "--data-dir", data]) == 2
    assert "unsupported file type" in capsys.readouterr().err


def test_cli_rag(tmp_path, docs, gpt2_small_ctx, capsys, monkeypatch):
    files = _files(tmp_path, docs)
    data = str(tmp_path / "data")
    assert main(["index", "add", *files, "--data-dir", data, "--no-progress"]) == 0
    capsys.readouterr()
    monkeypatch.setenv("TALLOW_GENERATOR", str(gpt2_small_ctx))
    assert main(["rag", "Record of language changes", "--data-dir", data, "--k", "2", "--max-new-tokens", "8",
                 "--json"]) == 0
    ans = json.loads(capsys.readouterr().out)
    assert ans["sources"] and ans["prompt"].endswith("Answer:") and ans["prompt_tokens"] <= 96 - 8


def test_a_bad_jsonl_line_names_its_file_and_line_and_nothing_is_ingested(tmp_path, docs, capsys):
    good = json.dumps({"id": "fine", "text": docs[0]["text"]})
    cases = {
        "no-text.jsonl": (f'{good}\n{{"id": "b"}}\n', "no-text.jsonl:2: text must be a str, got NoneType"),
        "broken.jsonl": (f'{good}\n\n{{"id": "c", text}}\n', "broken.jsonl:3: not valid JSON"),
        "extra.jsonl": (f'{good}\n{{"text": "x", "colour": 1}}\n', "extra.jsonl:2: has unknown fields ['colour']"),
        "twice.jsonl": (f'{good}\n{{"id": "fine", "text": "other"}}\n', "twice.jsonl:2: id 'fine' was already used at"),
    }
    data = tmp_path / "data"
    for name, (content, expected) in cases.items():
        (tmp_path / name).write_text(content)
        assert main(["index", "add", str(tmp_path / name), "--data-dir", str(data), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert expected in err and "nothing was ingested" in err, err
    assert not data.exists()  # refused before the engine opened anything
    # the server's rule for repeats: an exact repeat is kept once; ids given as null are the texts' sha256
    (tmp_path / "repeats.jsonl").write_text(f'{good}\n{good}\n{{"id": null, "text": "a"}}\n{{"id": null, "text": "b"}}\n')
    assert [d["text"] for d in read_documents([str(tmp_path / "repeats.jsonl")])] == [docs[0]["text"], "a", "b"]


def test_search_and_rag_on_an_empty_or_missing_data_directory_say_so(tmp_path, docs, capsys):
    missing = tmp_path / "typo"
    for argv in (["index", "search", "anything"], ["rag", "anything?"], ["index", "stats"]):
        assert main([*argv, "--data-dir", str(missing)]) == 2
        err = capsys.readouterr().err
        assert "no data directory" in err and "tallow index add" in err, err
    assert not missing.exists()  # not created by a read
    empty = tmp_path / "empty"
    assert main(["index", "add", str(tmp_path / "none.txt"), "--data-dir", str(empty)]) == 2  # no such file
    capsys.readouterr()
    empty.mkdir(exist_ok=True)
    for argv in (["index", "search", "anything"], ["rag", "anything?"]):
        assert main([*argv, "--data-dir", str(empty)]) == 1
        captured = capsys.readouterr()
        assert "holds no documents" in captured.err and "tallow index add" in captured.err
        assert captured.out == ""

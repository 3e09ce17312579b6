"""`megatron-reweight-demo` (run by scripts/setup.sh) says where the corpus is in one line."""

from __future__ import annotations

from megatron_reweight.data import demo


def test_demo_command_prints_one_line(tmp_path, monkeypatch, capsys):
    sources = {name: (lambda name=name: iter([f"A {name} document.\n\nAnother one."] * 20)) for name in "abc"}
    monkeypatch.setattr(demo, "DOMAIN_SOURCES", sources)  # a tiny corpus: built in a moment
    assert demo.main(["--root", str(tmp_path)]) == 0
    built = demo.ensure_demo_data(tmp_path)
    assert capsys.readouterr().out == (
        f"demo corpus in {tmp_path}: domains {', '.join(built.domains)}; tokenizer {built.tokenizer_path}\n"
    )

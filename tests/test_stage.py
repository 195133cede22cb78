from rsdist.config import SelectConfig
from rsdist.stage import StageResult, _settings, completed, fingerprint, run_stage


def test_complete_stage_is_skipped_and_changed_settings_rerun(run_dir):
    calls = []

    def body():
        calls.append(1)
        run_dir.write_text("x", "s", "out.txt")
        return StageResult(rows_in=3, rows_out=2, extra={"note": "hi"})

    first = run_stage(run_dir, "s", fingerprint({"a": 1}), body)
    again = run_stage(run_dir, "s", fingerprint({"a": 1}), body)
    assert len(calls) == 1 and not first["skipped"] and again["skipped"]
    assert again["rows_out"] == 2 and again["note"] == "hi"
    changed = run_stage(run_dir, "s", fingerprint({"a": 2}), body)
    assert len(calls) == 2 and not changed["skipped"]


def test_killed_stage_leaves_no_marker_and_reruns_from_empty(run_dir):
    def dies():
        run_dir.write_text("partial", "s", "part-0.txt")
        raise KeyboardInterrupt

    fp = fingerprint("x")
    try:
        run_stage(run_dir, "s", fp, dies)
    except KeyboardInterrupt:
        pass
    assert completed(run_dir, "s") is None
    assert run_dir.exists("s", "part-0.txt")

    def clean():
        assert not run_dir.exists("s", "part-0.txt")
        return StageResult(1, 1)

    run_stage(run_dir, "s", fp, clean)
    assert completed(run_dir, "s", fp) is not None


def test_resumable_stage_keeps_partial_output_of_same_settings_only(run_dir):
    fp = fingerprint("y")

    def dies():
        run_dir.write_text("partial", "s", "part-0.txt")
        raise KeyboardInterrupt

    try:
        run_stage(run_dir, "s", fp, dies, resumable=True)
    except KeyboardInterrupt:
        pass
    seen = {}

    def resume():
        seen["kept"] = run_dir.exists("s", "part-0.txt")
        return StageResult(1, 1)

    run_stage(run_dir, "s", fp, resume, resumable=True)
    assert seen["kept"]
    run_stage(run_dir, "s", fingerprint("other"), resume, resumable=True)
    assert seen["kept"] is False  # other settings: the partial output of the old ones is gone


def test_fingerprint_is_stable_and_sensitive():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_fingerprint_counts_settings_by_their_non_default_fields():
    import dataclasses

    @dataclasses.dataclass
    class Old:
        a: int = 1

    @dataclasses.dataclass
    class New:  # a later release adds a setting whose default keeps the old behaviour
        a: int = 1
        b: list = dataclasses.field(default_factory=lambda: [0])

    assert fingerprint(Old(), "up") == fingerprint(New(), "up")
    assert fingerprint(Old(a=2)) == fingerprint(New(a=2))
    assert fingerprint(New(b=[1])) != fingerprint(New())
    assert fingerprint(Old(a=2)) != fingerprint(Old())


def test_a_default_counts_by_value_and_the_contract_version_invalidates_old_runs(monkeypatch):
    """Settings at their defaults are left out of the fingerprint, whatever they name; a release that
    changes a default or what a stage writes bumps CONTRACT_VERSION, so older run directories re-run
    each stage once instead of being taken for new ones."""
    from rsdist import stage

    assert _settings(SelectConfig()) == {}
    assert _settings(SelectConfig(method="shift")) == {"method": "shift"}
    assert fingerprint(SelectConfig()) == fingerprint(SelectConfig(method=SelectConfig().method))
    assert fingerprint(SelectConfig()) != fingerprint(SelectConfig(method="shift"))
    before = fingerprint(SelectConfig(), "up")
    monkeypatch.setattr(stage, "CONTRACT_VERSION", stage.CONTRACT_VERSION + 1)
    assert fingerprint(SelectConfig(), "up") != before

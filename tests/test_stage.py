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


def test_a_changed_default_is_not_taken_for_the_old_one():
    """select.method's default changed from 'shift': runs made before the change (whose fingerprint
    left the then-default out) match an explicit 'shift', not the new default."""
    assert _settings(SelectConfig(method="shift")) == {}
    assert _settings(SelectConfig()) == {"method": "alignment-mmd"}
    assert fingerprint(SelectConfig(method="shift")) == fingerprint(SelectConfig(method="shift", budget=1 / 3))
    assert fingerprint(SelectConfig()) != fingerprint(SelectConfig(method="shift"))

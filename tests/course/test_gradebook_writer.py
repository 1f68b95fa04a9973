"""The one gradebook writer beside the sandboxed runs: batches, order, and a change by anyone else voids the batch."""

import threading

import pytest

from autograde.batch import GradebookWriter, IntegrityError


def test_records_every_student_once_in_batches_and_checks_the_gradebook(tmp_path):
    db = tmp_path / "gradebook.db"
    db.write_bytes(b"start")
    batches, seen_by = [], set()

    def record(students):  # stands in for nbgrader autograde: it writes the gradebook
        batches.append(students)
        seen_by.add(threading.current_thread().name)
        db.write_bytes(db.read_bytes() + ",".join(students).encode())

    writer = GradebookWriter(tmp_path, record, min_batch=3)
    for s in ["s1", "s2"]:
        writer.add(s)
    assert batches == []  # fewer than min_batch: waiting
    for s in ["s3", "s4", "s5"]:
        writer.add(s)
    for _ in range(200):  # the writer records while the grader goes on
        if batches:
            break
        threading.Event().wait(0.01)
    assert batches and len(batches[0]) >= 3
    writer.add("s6")
    writer.close()
    assert sorted(s for b in batches for s in b) == ["s1", "s2", "s3", "s4", "s5", "s6"]
    assert "s6" in batches[-1]  # what is left is recorded at close
    assert seen_by == {"gradebook-writer"}


def test_a_change_outside_the_writer_voids_the_batch(tmp_path):
    db = tmp_path / "gradebook.db"
    db.write_bytes(b"start")
    recorded = []
    writer = GradebookWriter(tmp_path, recorded.extend, min_batch=100)
    writer.add("s1")
    db.write_bytes(b"a classmate's grades, zeroed")  # not the writer: detected before its next write
    with pytest.raises(IntegrityError, match="changed outside the grader's writer"):
        writer.close()
    assert recorded == []  # nothing was recorded on top of the tampered gradebook


def test_a_failing_record_is_raised_in_the_graders_thread(tmp_path):
    def record(students):
        raise RuntimeError("nbgrader could not start")

    writer = GradebookWriter(tmp_path, record, min_batch=1)
    writer.add("s1")
    with pytest.raises(RuntimeError, match="nbgrader could not start"):
        writer.close()

"""The peftlab course's grader: ``python -m autograde {release,grade,validate,reset}`` (autograde/pipeline.py), and
the runner of graded cells that the course's tests share (autograde/cells.py)."""

"""The peftlab course's grader: ``python -m autograde {release,grade,validate,reset}`` (autograde/pipeline.py)."""

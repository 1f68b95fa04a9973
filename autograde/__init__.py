"""Grading tools of the peftlab course: ``python -m autograde {release,grade,validate,reset}`` (see peftlab.course)."""

"""nbgrader settings of the peftlab course. Every path is relative to the course folder (this one, by default).

``python -m autograde`` copies this file into the course folder it uses and fills ``source/`` from ``../solutions``.
"""

c = get_config()  # noqa: F821 - provided by nbgrader when it loads this file

c.CourseDirectory.course_id = "peftlab"
c.CourseDirectory.source_directory = "source"  # a copy of ../solutions, refreshed by python -m autograde
c.CourseDirectory.release_directory = "release"
c.CourseDirectory.submitted_directory = "submitted"  # submitted/<student>/<assignment>/<assignment>.ipynb
c.CourseDirectory.autograded_directory = "autograded"
c.CourseDirectory.feedback_directory = "feedback"
c.CourseDirectory.ignore = [".ipynb_checkpoints", "*.pyc", "__pycache__", "*.bak.ipynb"]

# nbgrader's default is 30 s per cell; grading runs with PEFTLAB_GRADING=1, so no graded cell needs near this.
c.Execute.timeout = 120
c.ExecutePreprocessor.timeout = 120
c.Execute.interrupt_on_timeout = True  # an infinite loop costs one cell, not the notebook

# A student who deleted a check cell gets it back (locked cells are restored from the gradebook anyway).
c.OverwriteCells.add_missing_cells = True
c.LimitOutput.max_lines = 200  # keep feedback readable when a submission prints in a loop

# No student code runs in nbgrader's process: `python -m autograde grade` has run every notebook in a sandbox and
# decided every check cell in its own process (autograde/batch.py, autograde/verdicts.py). ApplyRun, in place of
# nbgrader's Execute, puts those outputs and verdicts in (released sources for the locked cells: no hidden test
# reaches the feedback); SaveAutoGrades then scores them. StderrIsNotAVerdict stays for `validate`'s sake.
c.Autograde.autograde_preprocessors = [
    "autograde.preprocessors.ApplyRun",
    "autograde.preprocessors.StderrIsNotAVerdict",
    "nbgrader.preprocessors.IgnorePattern",
    "nbconvert.preprocessors.ClearMetadataPreprocessor",
    "nbgrader.preprocessors.LimitOutput",
    "nbgrader.preprocessors.SaveAutoGrades",
    "nbgrader.preprocessors.AssignLatePenalties",
    "nbgrader.preprocessors.CheckCellMetadata",
]

c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
c.ClearSolutions.text_stub = "YOUR ANSWER HERE"

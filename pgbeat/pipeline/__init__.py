"""The pipeline: the step table, the run record that travels between steps, and the in-process runner.
"""

"""Models: references (Hub, local, single files, plug-in schemes), pipeline folders, loading, the student."""

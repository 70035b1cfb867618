"""textgen: a FastAPI model server (README.md; docs/ for the reference)."""

from textgen.openmp import default_spin_count

# Before any module of the package imports torch (libgomp reads its environment once, when it loads).
default_spin_count()

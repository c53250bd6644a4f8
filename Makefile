.PHONY: test lint demo
test:
	python -m pytest -n 2 tests
lint:
	ruff check vtc tests eval
demo:
	vtc demo

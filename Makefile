# sudo make demo | test | bench — each runs `setup` first.
.PHONY: setup test demo bench lint clean

setup:
	scripts/bootstrap.sh

test: setup
	.venv/bin/pytest -ra

demo: setup
	scripts/demo.sh

bench: setup
	.venv/bin/python -m bench

lint:
	.venv/bin/ruff check agent tests bench
	.venv/bin/ruff format --check agent tests bench

clean:
	rm -rf .venv *.egg-info

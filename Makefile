# sudo make demo | test | bench — each runs `setup` first.
# sudo make install | uninstall — the CLIs on root's PATH (wrappers in $(PREFIX)/bin).
.PHONY: setup test demo bench lint clean install uninstall

PREFIX ?= /usr/local

setup:
	scripts/bootstrap.sh

test: setup
	.venv/bin/pytest -ra

demo: setup
	scripts/demo.sh

bench: setup
	.venv/bin/python -m bench

install:
	scripts/install.sh install $(PREFIX)

uninstall:
	scripts/install.sh uninstall $(PREFIX)

lint:
	.venv/bin/ruff check agent tests bench
	.venv/bin/ruff format --check agent tests bench

clean:
	rm -rf .venv *.egg-info

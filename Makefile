# Everything an engineer or an administrator runs: `make test`, `make demo`.
# Both work on a machine with only Python, pip, make and a C compiler: no root,
# no system PostgreSQL, no system IMAP server.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: test lint demo venv readme clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

lint: venv
	$(BIN)/ruff check supervisor_mail tests bench

test: lint
	$(BIN)/python -m pytest

demo: venv
	$(BIN)/supervisor-mail demo

# Regenerate the generated parts: the sample configuration and the README reference.
readme: venv
	$(BIN)/supervisor-mail config sample > etc/supervisor_mail.conf
	$(BIN)/python -c "import re; from supervisor_mail.config import reference_markdown as r; \
	s = open('README.md').read(); \
	s = re.sub(r'(<!-- settings:begin -->\\n).*?(<!-- settings:end -->)', \
	           lambda m: m[1] + r() + m[2], s, flags=re.S); open('README.md', 'w').write(s)"

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache

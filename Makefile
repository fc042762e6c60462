# Everything an engineer or an administrator runs: `make test`, `make demo`.
# Both work on a machine with only Python, pip, make and a C compiler: no root,
# no system PostgreSQL, no system IMAP server.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: test lint demo venv readme clean install install-ramdisk uninstall

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

# --- install: as root, or staged with DESTDIR (and PREFIX) for packagers -----------------
# The package goes into a dedicated virtual environment at PREFIX, built on the system's
# python3: the engine's dependencies never meet the distribution's Python packages (nor
# PEP 668's "externally managed" refusal), it runs for any user (a pyenv under /root would
# not), and upgrading is `make install` again. A virtualenv records its own path (script
# shebangs, bin/activate, pyvenv.cfg, .pyc file names), so with DESTDIR it is built in
# the staging tree and exactly those records are rewritten to PREFIX, as Debian's
# dh-virtualenv does: the staged tree works once copied to /.
PREFIX         ?= /opt/supervisor_mail
SYSCONFDIR     ?= /etc
CONFDIR        ?= $(SYSCONFDIR)/supervisor_mail
SYSTEMDDIR     ?= $(SYSCONFDIR)/systemd/system
TMPFILESDIR    ?= $(SYSCONFDIR)/tmpfiles.d
RUNDIR         ?= /run/supervisor_mail
LOGDIR         ?= /var/log/supervisor_mail
ENGINE_USER    ?= www-data
INSTALL_PYTHON ?= $(firstword $(wildcard /usr/bin/python3) $(PYTHON))
PIP_FLAGS      ?=
STAGE           = $(DESTDIR)$(PREFIX)
CONF            = $(DESTDIR)$(CONFDIR)/supervisor_mail.conf
RAMDISK_MARK    = \# supervisor_mail ramdisk (make install-ramdisk; make uninstall removes it)
# Ownership needs root and the user; a staging build by someone else leaves it to the package.
OWNER = $(shell [ "$$(id -u)" = 0 ] && id -u $(ENGINE_USER) >/dev/null 2>&1 \
                && echo "-o $(ENGINE_USER) -g $$(id -gn $(ENGINE_USER))")
GROUP = $(shell [ "$$(id -u)" = 0 ] && id -u $(ENGINE_USER) >/dev/null 2>&1 \
                && echo "-g $$(id -gn $(ENGINE_USER))")
# The samples in etc/ name the default paths and user; installed, they name the real ones.
SUBST = sed -e 's|/opt/supervisor_mail|$(PREFIX)|g' -e 's|/etc/supervisor_mail|$(CONFDIR)|g' \
            -e 's|/var/log/supervisor_mail|$(LOGDIR)|g' -e 's|/run/supervisor_mail|$(RUNDIR)|g' \
            -e 's|www-data|$(ENGINE_USER)|g'

install:
	@if [ -z "$(DESTDIR)" ] && [ "$$(id -u)" != 0 ]; then \
	    echo "make install: run it as root, or stage it with DESTDIR=DIR (and PREFIX=...)"; \
	    exit 1; fi
	$(INSTALL_PYTHON) -m venv $(STAGE)
	$(STAGE)/bin/python -m pip install --quiet --disable-pip-version-check --no-compile \
	    $(PIP_FLAGS) .
	@if [ -n "$(DESTDIR)" ]; then \
	    grep -rlIZF '$(STAGE)' $(STAGE)/bin $(STAGE)/pyvenv.cfg \
	        | xargs -0 -r sed -i 's|$(STAGE)|$(PREFIX)|g'; fi
	$(STAGE)/bin/python -m compileall -q -j0 $(if $(DESTDIR),-s '$(DESTDIR)' -p /) \
	    $(STAGE)/lib >/dev/null
	install -d -m 0755 $(STAGE)/share/supervisor_mail
	for f in crontab fstab.ramdisk; do \
	    $(SUBST) etc/$$f > $(STAGE)/share/supervisor_mail/$$f; \
	    chmod 0644 $(STAGE)/share/supervisor_mail/$$f; done
	install -d -m 0750 $(GROUP) $(DESTDIR)$(CONFDIR)
	$(STAGE)/bin/python -m supervisor_mail config sample \
	    | sed -e 's|^#user =.*|user = $(ENGINE_USER)|' -e 's|^#data_dir =.*|data_dir = $(RUNDIR)|' \
	          -e 's|^#pid_dir =.*|pid_dir = $(RUNDIR)/pid|' -e 's|^#log_dir =.*|log_dir = $(LOGDIR)|' \
	          -e '4a # `make install` set user, data_dir, pid_dir and log_dir.' > $(CONF).new
	install -m 0640 $(GROUP) $(CONF).new $(CONF).sample
	@if [ ! -e $(CONF) ]; then install -m 0640 $(GROUP) $(CONF).new $(CONF); \
	 elif ! cmp -s $(CONF) $(CONF).new; then \
	    echo "kept your edited $(CONFDIR)/supervisor_mail.conf; the new defaults are in" \
	         "$(CONFDIR)/supervisor_mail.conf.sample"; fi
	rm -f $(CONF).new
	install -d -m 2770 $(OWNER) $(DESTDIR)$(RUNDIR) $(DESTDIR)$(RUNDIR)/pid $(DESTDIR)$(LOGDIR)
	install -d -m 0755 $(DESTDIR)$(TMPFILESDIR) $(DESTDIR)$(SYSTEMDDIR) \
	    $(DESTDIR)$(SYSCONFDIR)/supervisor/conf.d $(DESTDIR)$(SYSCONFDIR)/logrotate.d
	$(SUBST) etc/tmpfiles.conf > $(DESTDIR)$(TMPFILESDIR)/supervisor_mail.conf
	$(SUBST) etc/supervisord.conf > $(DESTDIR)$(SYSCONFDIR)/supervisor/conf.d/supervisor_mail.conf
	$(SUBST) etc/supervisor_mail.service > $(DESTDIR)$(SYSTEMDDIR)/supervisor_mail.service
	$(SUBST) etc/logrotate.conf > $(DESTDIR)$(SYSCONFDIR)/logrotate.d/supervisor_mail
	chmod 0644 $(DESTDIR)$(TMPFILESDIR)/supervisor_mail.conf \
	    $(DESTDIR)$(SYSCONFDIR)/supervisor/conf.d/supervisor_mail.conf \
	    $(DESTDIR)$(SYSTEMDDIR)/supervisor_mail.service \
	    $(DESTDIR)$(SYSCONFDIR)/logrotate.d/supervisor_mail
	@$(if $(OWNER),,echo "note: not root (or no user $(ENGINE_USER)): the directories are" \
	    "not owned by $(ENGINE_USER); the package's postinst must chown them";)
	@echo "installed $(PREFIX) (DESTDIR=$(DESTDIR)); next: set [database] dsn in" \
	      "$(CONFDIR)/supervisor_mail.conf, run supervisor-mail initdb, then start it" \
	      "under supervisord, systemd or cron (README, Operations)"

# Appends the tmpfs line to fstab (once) and mounts it, unless staged or the engine runs.
install-ramdisk:
	@fstab=$(DESTDIR)$(SYSCONFDIR)/fstab; mkdir -p $$(dirname $$fstab); touch $$fstab; \
	if grep -qxF '$(RAMDISK_MARK)' $$fstab; then echo "$$fstab has the ramdisk line already"; \
	else uid=$$(id -u $(ENGINE_USER) 2>/dev/null || echo 33); \
	     gid=$$(id -g $(ENGINE_USER) 2>/dev/null || echo 33); \
	     { echo '$(RAMDISK_MARK)'; $(SUBST) etc/fstab.ramdisk | grep -v '^#' \
	       | sed "s|uid=33,gid=33|uid=$$uid,gid=$$gid|"; } >> $$fstab; \
	     echo "added the ramdisk line to $$fstab"; fi
	@if [ -z "$(DESTDIR)" ] && ! mountpoint -q $(RUNDIR); then \
	    $(PREFIX)/bin/supervisor-mail healthcheck -c $(CONFDIR)/supervisor_mail.conf \
	        >/dev/null 2>&1; \
	    if [ $$? != 2 ]; then echo "stop the engine before mounting the ramdisk over" \
	        "$(RUNDIR)"; exit 1; fi; \
	    mount $(RUNDIR) && install -d -m 2770 $(OWNER) $(RUNDIR)/pid \
	    && echo "mounted $(RUNDIR)"; fi

# Undoes install; keeps the data and log directories, and an edited configuration.
uninstall:
	@if [ -z "$(DESTDIR)" ] && [ -x $(PREFIX)/bin/supervisor-mail ]; then \
	    $(PREFIX)/bin/supervisor-mail stop -c $(CONFDIR)/supervisor_mail.conf || true; fi
	@if [ -f $(STAGE)/pyvenv.cfg ]; then rm -rf $(STAGE); echo "removed $(STAGE)"; fi
	rm -f $(DESTDIR)$(TMPFILESDIR)/supervisor_mail.conf \
	    $(DESTDIR)$(SYSCONFDIR)/supervisor/conf.d/supervisor_mail.conf \
	    $(DESTDIR)$(SYSTEMDDIR)/supervisor_mail.service \
	    $(DESTDIR)$(SYSCONFDIR)/logrotate.d/supervisor_mail
	@if [ -e $(CONF) ] && ! cmp -s $(CONF) $(CONF).sample; then \
	    echo "kept your edited $(CONF)"; else rm -f $(CONF); fi
	rm -f $(CONF).sample
	-@rmdir $(DESTDIR)$(CONFDIR) 2>/dev/null
	@if [ -f $(DESTDIR)$(SYSCONFDIR)/fstab ]; then \
	    sed -i '\|^$(RAMDISK_MARK)$$|,+1d' $(DESTDIR)$(SYSCONFDIR)/fstab; fi
	@echo "kept $(RUNDIR) and $(LOGDIR) (data and logs)"

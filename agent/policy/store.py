"""The rule store: rules.json under a lock, replaced atomically on every change.

Rules live in ``$EGRESS_TOP_STATE_DIR/rules.json`` (default /var/lib/egress-top), an
indented JSON document (agent/policy/store_document.py) guarded by ``rules.lock``
(flock: exclusive to write, shared to read, every wait bounded: agent/lockfile.py)
and replaced atomically on every change, so parallel ``egress-block`` runs all land
and a crash leaves either the old or the new file. Policy is sensitive: the directory
is 0700, its files 0600. A slot is kept while its container name has a rule; each
sync rewrites the trie and every running container's tag together, so an endpoint
still tagged with a freed slot never picks up someone else's rules.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import tempfile
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from agent.errors import EXIT_PERMISSION, EXIT_STORE, EXIT_USAGE, UserError
from agent.lockfile import bounded_lock, private_dir
from agent.policy.document import DocumentError, decode_text
from agent.policy.names import Resolver, resolve
from agent.policy.rules import (
    Rule,
    RuleKey,
    check_container,
    normalise_addresses,
    parse_key,
    rfc3339,
    rule_spec,
    traffic_text,
)
from agent.policy.store_document import StoreContents, parse_document, render_document

STATE_DIR_ENV = "EGRESS_TOP_STATE_DIR"
DEFAULT_STATE_DIR = Path("/var/lib/egress-top")


def default_state_dir() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)


class RuleStore:
    def __init__(self, state_dir: Path | None = None, lock_timeout: float | None = None):
        self.state_dir = state_dir or default_state_dir()
        self.path = self.state_dir / "rules.json"
        self.lock_path = self.state_dir / "rules.lock"
        self.lock_timeout = lock_timeout  # None: EGRESS_TOP_LOCK_TIMEOUT or lockfile's default

    # -- reading and writing

    def load(self) -> StoreContents:
        """A consistent snapshot: use it when rules and slots must agree (lpm_entries)."""
        if not self.state_dir.is_dir():
            return StoreContents()
        with self._locked(fcntl.LOCK_SH):
            return self._decode(self._read_text())

    @contextlib.contextmanager
    def transaction(self) -> Iterator[StoreContents]:
        """Read-modify-write under the exclusive lock. The document is written back,
        atomically, only if the block finishes without an exception and changed it."""
        with self._io_errors("create"):
            private_dir(self.state_dir, owner=os.geteuid())
        with self._locked(fcntl.LOCK_EX):
            before = self._read_text()
            contents = self._decode(before)
            yield contents
            after = render_document(contents)
            if after != before:
                self._write_atomically(after)

    @contextlib.contextmanager
    def _locked(self, operation: int) -> Iterator[None]:
        exclusive = operation == fcntl.LOCK_EX
        with (
            self._io_errors("open"),
            bounded_lock(self.lock_path, f"rule store {self.path}", exclusive, self.lock_timeout),
        ):
            yield

    def _read_text(self) -> str | None:
        with self._io_errors("read"):
            try:
                raw = self.path.read_bytes()
            except FileNotFoundError:
                return None
        try:
            return decode_text(raw)
        except DocumentError as exc:
            raise self._unusable(str(exc)) from exc

    def _write_atomically(self, text: str) -> None:
        with self._io_errors("write"):
            fd, temp_name = tempfile.mkstemp(dir=self.state_dir, prefix=".rules.json.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as temp:
                    temp.write(text)
                    temp.flush()
                    os.fsync(temp.fileno())
                os.replace(temp_name, self.path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp_name)
                raise
            # The rename is durable only once the directory itself is on disk.
            dir_fd = os.open(self.state_dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    @contextlib.contextmanager
    def _io_errors(self, verb: str) -> Iterator[None]:
        try:
            yield
        except PermissionError as exc:
            raise UserError(
                f"cannot {verb} {exc.filename or self.state_dir}: permission denied; run as root, "
                f"or point {STATE_DIR_ENV} at a directory you own",
                EXIT_PERMISSION,
            ) from exc
        except OSError as exc:
            raise UserError(
                f"cannot {verb} {exc.filename or self.state_dir}: {exc.strerror or exc}", EXIT_STORE
            ) from exc

    def _unusable(self, reason: str) -> UserError:
        return UserError(
            f"cannot use rule store {self.path}: {reason}; it was left as it is: "
            "fix it, or move it aside to start with no rules",
            EXIT_STORE,
        )

    def _decode(self, text: str | None) -> StoreContents:
        if text is None:
            return StoreContents()
        try:
            return parse_document(text)
        except DocumentError as exc:
            raise self._unusable(str(exc)) from exc

    # -- operations

    def add(
        self,
        container: str,
        dest: str,
        *,
        action: str,
        port: int | None = None,
        proto: str = "any",
        pending: bool = False,
        resolver: Resolver = socket.getaddrinfo,
        now: datetime | None = None,
    ) -> tuple[Rule, bool]:
        """Add a rule, or replace the one with the same key (then True): see agent/policy/semantics.py.
        A host name is resolved first, outside the lock; failing to resolve adds nothing."""
        spec = rule_spec(container, dest, action, port, proto)
        added_at = rfc3339(now)
        name_addresses = resolve(spec.key.dest, resolver) if spec.dest_kind == "name" else ()
        with self.transaction() as contents:
            existing = contents.find(spec.key)
            if existing is not None:
                # Re-adding makes it the newest rule: it goes to the end of the age order.
                contents.rules.remove(existing)
            contents.ensure_slot(spec.key.container)
            rule_id = existing.rule_id if existing else contents.allocate_rule_id()
            rule = spec.to_rule(rule_id, added_at, name_addresses, pending)
            contents.rules.append(rule)
        return rule, existing is not None

    def remove(self, container: str, dest: str, port: int | None = None, proto: str = "any") -> Rule:
        """Remove the rule with exactly this key, whatever its action."""
        key, _ = parse_key(container, dest, port, proto)
        with self.transaction() as contents:
            rule = contents.find(key)
            if rule is None:
                raise UserError(_no_such_rule(key, contents.rules_of(key.container)), EXIT_USAGE)
            contents.rules.remove(rule)
            contents.free_unused_slots()
        return rule

    def remove_all(self, container: str) -> list[Rule]:
        name = check_container(container)
        with self.transaction() as contents:
            removed = contents.rules_of(name)
            contents.rules = [rule for rule in contents.rules if rule.container != name]
            contents.free_unused_slots()
        return removed

    def rules(self, container: str | None = None) -> list[Rule]:
        """Rules in age order (oldest first), all or one container's."""
        rules = self.load().rules
        if container is None:
            return rules
        name = check_container(container)
        return [rule for rule in rules if rule.container == name]

    def slots(self) -> dict[str, int]:
        return self.load().slots

    def update_addresses(
        self, resolved: Mapping[str, Iterable[str]], now: datetime | None = None
    ) -> list[Rule]:
        """Give the name rules of each resolved name its new addresses and resolved_at;
        returns the rules whose addresses changed. Names not in resolved keep theirs."""
        new_addresses = {name: normalise_addresses(addresses) for name, addresses in resolved.items()}
        if not all(new_addresses.values()):
            # An empty list would leave a rule matching nothing, and a store that refuses to load.
            raise ValueError("a resolved name needs at least one address")
        resolved_at = rfc3339(now)
        with self.transaction() as contents:
            before = {
                rule.rule_id: rule
                for rule in contents.rules
                if rule.dest_kind == "name" and rule.dest in new_addresses
            }
            refreshed = {
                rule_id: replace(rule, addresses=new_addresses[rule.dest], resolved_at=resolved_at)
                for rule_id, rule in before.items()
            }
            contents.replace_rules(refreshed)
        return [rule for rule_id, rule in refreshed.items() if rule.addresses != before[rule_id].addresses]

    def sync_pending(self, existing_containers: Collection[str]) -> list[Rule]:
        """Mark rules pending exactly when no container of theirs exists; returns the
        rules whose mark changed. Writes nothing if none did."""
        with self.transaction() as contents:
            flipped = {
                rule.rule_id: replace(rule, pending=not rule.pending)
                for rule in contents.rules
                if rule.pending == (rule.container in existing_containers)
            }
            contents.replace_rules(flipped)
        return list(flipped.values())


def _no_such_rule(key: RuleKey, container_rules: Sequence[Rule]) -> str:
    wanted = f"no rule for {key.container} matches {key.dest} {traffic_text(key.proto, key.port)}"
    if not container_rules:
        return f"{wanted}; {key.container} has no rules"
    shown = ", ".join(rule.summary() for rule in container_rules[:5])
    more = f" and {len(container_rules) - 5} more" if len(container_rules) > 5 else ""
    return f"{wanted}; {key.container} has: {shown}{more}"

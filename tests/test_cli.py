"""The `rlhf-online` parser: services/cli.py with the library's commands, each module imported only when chosen."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rlhf_online.errors import ConfigError
from services import cli


def test_a_command_imports_no_benchmark_until_one_is_chosen():
    code = ("import sys; from services import cli; cli.parser().parse_args(['policies', 'list']); "
            "print(sorted(m for m in sys.modules if m.startswith('rlhf_online.bench') or m == 'rlhf_online.demo'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.strip() == "[]"


def test_the_chosen_benchmark_and_the_demo_get_their_flags():
    args = cli.parser().parse_args(["bench", "reward", "--items", "3"])
    assert (args.bench_command, args.items) == ("reward", 3)
    args = cli.parser().parse_args(["demo", "--batch-size", "5", "--kl-budget", "2"])
    assert (args.batch_size, args.kl_budget, args.learning_rate) == (5, 2.0, 1e-3)



def test_simulate_takes_a_rated_fraction_and_rejects_one_out_of_range():
    assert cli.parser().parse_args(["simulate"]).rated_fraction == 1.0
    args = cli.parser().parse_args(["simulate", "--addr", "127.0.0.1:1", "--rated-fraction", "0"])
    # Rejected by the users' config before any user connects (nothing listens at that address).
    with pytest.raises(ConfigError, match="rated_fraction"):
        args.fn(args)


def test_keys_create_list_and_revoke_in_the_services_store(tmp_path, capsys, monkeypatch):
    from rlhf_online.auth.keys import KeyAuthenticator
    from rlhf_online.errors import Unauthenticated
    from rlhf_online.store import open_store

    monkeypatch.setenv("RLHF_DATA_DIR", str(tmp_path))  # the services' default store: <data dir>/rlhf.db
    assert cli.main(["keys", "create", "--tenant", "acme", "--role", "annotator"]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]  # the key is the last line
    with open_store(f"sqlite:///{tmp_path / 'rlhf.db'}") as store:
        who = KeyAuthenticator(store, cache_seconds=0).identify(key)
        assert (who.tenant, who.role) == ("acme", "annotator")
        assert cli.main(["keys", "list"]) == 0
        listed = capsys.readouterr().out
        assert who.key_id in listed and "tenant=acme" in listed and "active" in listed and key not in listed
        assert cli.main(["keys", "revoke", who.key_id]) == 0
        with pytest.raises(Unauthenticated, match="revoked"):
            KeyAuthenticator(store, cache_seconds=0).identify(key)
    assert cli.main(["keys", "revoke", "nope"]) == 1
    assert cli.main(["keys", "create", "--tenant", ""]) == 1
    assert "tenant" in capsys.readouterr().err


def test_simulate_takes_a_rank_n_and_rejects_one_out_of_range():
    assert cli.parser().parse_args(["simulate"]).rank_n == 0
    assert cli.parser().parse_args(["simulate", "--rank-n", "4"]).rank_n == 4
    args = cli.parser().parse_args(["simulate", "--addr", "127.0.0.1:1", "--rank-n", "1"])
    # Rejected by the users' config before any user connects (nothing listens at that address).
    with pytest.raises(ConfigError, match="rank_n"):
        args.fn(args)


def test_simulate_checks_its_tls_files_before_any_user_connects(tmp_path, monkeypatch):
    for var in ("RLHF_TLS_CA", "RLHF_TLS_CLIENT_CERT", "RLHF_TLS_CLIENT_KEY"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\nQUJD\n-----END PRIVATE KEY-----\n")
    for argv in (["--tls-client-cert", str(tmp_path / "c.pem")],  # a client certificate without a CA
                 ["--tls-ca", str(tmp_path / "missing.pem")],
                 ["--tls-ca", str(tmp_path / "key.pem")]):  # a key where the CA bundle belongs
        args = cli.parser().parse_args(["simulate", "--addr", "127.0.0.1:1", *argv])
        with pytest.raises(ConfigError, match="^tls_ca: ") as e:
            args.fn(args)
        assert "QUJD" not in str(e.value)  # never the file's contents

"""The ``cipherfeed`` command line: run the mesh, manage client keys, get a private feed."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import unicodedata
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import grpc
import numpy as np

from cipherfeed.atomicfile import PRIVATE, write_atomic
from cipherfeed.checkpoint import Verifier
from cipherfeed.client import history as history_store
from cipherfeed.client.history import HistoryEntry, HistoryError, HistoryStore
from cipherfeed.client.interest import Engagement, history_interest, history_weights
from cipherfeed.client.keystore import KeyStoreError
from cipherfeed.client.ranking import rank_feed
from cipherfeed.client.sdk import ClientError, EncryptedScores, RecommenderClient
from cipherfeed.config import ClientConfig, ConfigError, RecommenderConfig, TlsConfig
from cipherfeed.grpcutil import RunningServer
from cipherfeed.he import packing
from cipherfeed.he.packing import plaintext_scores
from cipherfeed.manifest import CatalogueItem
from cipherfeed.receipts import Receipt
from cipherfeed.trust import TrustAnchors
from cipherfeed.v1 import keyservice_pb2, ledger_pb2_grpc

if TYPE_CHECKING:  # the services are imported only by the commands that start them
    from cipherfeed.devredis import LocalRedis
    from services.keyservice.core import KeyServiceCore
    from services.ledger.anchor import Anchorer
    from services.ledger.core import LedgerCore
    from services.recommender.artifact import ModelArtifact
    from services.recommender.core import RecommenderCore


def _client(args: argparse.Namespace) -> RecommenderClient:
    config = ClientConfig.from_env()
    config = replace(
        config,
        target=args.target or config.target,
        keyservice_target=args.keyservice or config.keyservice_target,
        ledger_target=getattr(args, "ledger", None) or config.ledger_target,
        home=args.home or config.home,
    )
    return RecommenderClient(config)


def creator_history(client: RecommenderClient, account_id: str) -> list[HistoryEntry]:
    """A dataset creator's own listed videos as likes, newest first, mapped through the manifest."""
    manifest = client.manifest()
    start = history_store.now()
    return [
        HistoryEntry(item_id=manifest.item_ids[i], kind="like", unix=start - rank)
        for rank, i in enumerate(client.items_of_creator(account_id))
    ]


def device_history(client: RecommenderClient, user: str) -> tuple[list[Engagement], bool]:
    """The user's history from the device store, seeded from their own videos when empty."""
    store = HistoryStore(client.config.home / "history")
    entries = store.entries(user)
    seeded = not entries
    if seeded:
        store.add(user, creator_history(client, user))
        entries = store.entries(user)
    return history_store.engagements(entries), seeded


def printable(text: str) -> str:
    """``text`` with every control, format (bidi overrides, zero-width), separator-line and
    unassigned character replaced by '?': a manifest's strings are the recommender's, and raw they
    could drive the terminal (ANSI/OSC sequences: titles, clipboard writes, erased lines)."""
    return "".join(
        "?" if unicodedata.category(ch)[0] == "C" or unicodedata.category(ch) in ("Zl", "Zp") else ch for ch in text
    )


def print_feed(items: list, out: TextIO = sys.stdout) -> None:
    print(f"{'#':>2}  {'creator':<28} {'video id':<20} url", file=out)
    for n, item in enumerate(items, 1):
        creator, item_id, url = printable(item.creator_id), printable(item.item_id), printable(item.url)
        print(f"{n:>2}  {creator[:28]:<28} {item_id:<20} {url}", file=out)


def recommend(
    client: RecommenderClient, account_id: str, k: int, per_creator: int
) -> tuple[list[CatalogueItem], EncryptedScores]:
    created = client.use_keys()
    if created:
        print(
            f"generated a CKKS key pair in {client.config.home / 'keys'} (secret key stays here)",
            file=sys.stderr,
        )
    key_id = client.register()
    print(f"rotation keys registered with the key service as {key_id[:16]}…", file=sys.stderr)
    downloads = client.manifest_downloads
    manifest = client.manifest()
    print(
        f"catalogue manifest of model {manifest.model_version[:16]}: {manifest.item_count} items, "
        + (
            f"downloaded once for this model ({client.manifests.path(manifest.model_version).stat().st_size:,} bytes)"
            if client.manifest_downloads > downloads
            else "from this device's cache"
        )
        + ", digest checked",
        file=sys.stderr,
    )
    history, seeded = device_history(client, account_id)
    where = client.config.home / "history"
    print(
        f"history of {account_id}: {len(history)} engagements on this device ({where})"
        + (", seeded with the creator's own videos" if seeded else ""),
        file=sys.stderr,
    )
    t0 = time.perf_counter()
    feed, scored = client.recommend(history, k=k, per_creator_cap=per_creator)
    elapsed = 1e3 * (time.perf_counter() - t0)
    p = client.params()
    blocks = packing.block_count(manifest.item_count, p.items_per_ciphertext)
    print(
        f"history sent as weights over the catalogue, encrypted ({blocks} ciphertexts); the server "
        f"projected it with its embeddings and scored {scored.scores.shape[0]} items under encryption: "
        f"server {scored.server_millis:.0f} ms, round trip {elapsed:.0f} ms, "
        f"response {scored.response_bytes / 1024:.0f} KiB, model {scored.model_version[:16]}",
        file=sys.stderr,
    )
    print("feed ranked, filtered and displayed on the device from the manifest:", file=sys.stderr)
    print_feed(feed)
    if scored.receipt is not None:
        saved = save_receipt(client.config.home, scored.receipt)
        print(f"receipt {scored.receipt_id} (saved to {saved}); check it with 'cipherfeed verify'", file=sys.stderr)
    return feed, scored


def save_receipt(home: Path, receipt: Receipt) -> Path:
    path = home / "receipts" / f"{receipt.receipt_id}.json"
    write_atomic(path, (json.dumps(asdict(receipt), sort_keys=True, indent=2) + "\n").encode(), PRIVATE)
    return path


def saved_receipt_path(home: Path, receipt_id: str) -> Path:
    return home / "receipts" / f"{receipt_id}.json"


def cmd_recommend(args: argparse.Namespace) -> int:
    with _client(args) as client:
        recommend(client, args.user, args.k, args.per_creator)
    return 0


def _parse_time(raw: str | None) -> int:
    if raw is None:
        return history_store.now()
    if raw.isdigit():
        return int(raw)
    from datetime import datetime, timezone

    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        raise HistoryError(f"--at {raw!r} is neither Unix seconds nor an ISO 8601 time") from None
    return int((when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp())


def cmd_history(args: argparse.Namespace) -> int:
    store = HistoryStore((args.home or ClientConfig.from_env().home) / "history")
    if args.history_command == "show":
        from datetime import datetime, timezone

        entries = store.entries(args.user)
        for e in entries:
            stamp = datetime.fromtimestamp(e.unix, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
            print(f"{stamp}  {printable(e.kind):<7}  {printable(e.item_id)}")
        print(f"{len(entries)} engagements of {args.user} in {store.path(args.user)}", file=sys.stderr)
        return 0
    if args.history_command == "clear":
        removed = store.clear(args.user)
        print(f"history of {args.user} {'cleared' if removed else 'was already empty'}", file=sys.stderr)
        return 0
    when = _parse_time(args.at)
    with _client(args) as client:  # ids and indices are checked against the manifest, on the device
        manifest = client.manifest()
        item_ids = []
        for raw in args.items:
            if args.index:
                if not raw.isdigit() or int(raw) >= manifest.item_count:
                    raise HistoryError(f"{raw!r} is not a catalogue index (0..{manifest.item_count - 1})")
                item_ids.append(manifest.item_ids[int(raw)])
            elif raw in manifest.index_of:
                item_ids.append(raw)
            else:
                raise HistoryError(f"item {raw!r} is not in the catalogue of model {manifest.model_version[:16]}")
    written = store.add(args.user, [HistoryEntry(item_id, args.kind, when) for item_id in item_ids])
    print(f"added {written} {args.kind} engagements to the history of {args.user}", file=sys.stderr)
    return 0


def signing_verifiers(client: RecommenderClient, origin: str, key_name: str) -> list[Verifier]:
    """The mesh's published checkpoint keys, as note verifiers named after the log's origin.
    Only an operator writing its trust file asks this; a verifying client never does."""
    reply = client.keyservice.GetPublicKeys(
        keyservice_pb2.GetPublicKeysRequest(), timeout=client.config.deadline_seconds
    )
    return [Verifier(origin, k.ed25519_public_key) for k in reply.keys if k.key_name == key_name]


def web3_chain_root(rpc_url: str) -> Callable[[str, int], bytes]:
    chain = Web3Chain(rpc_url)
    return chain.root_at


class Web3Chain:
    """The anchor contract read over a JSON-RPC node (``--chain-rpc``): the user's choice of node;
    its chain id is checked against the pinned one."""

    def __init__(self, rpc_url: str) -> None:
        from web3 import Web3

        self._w3 = Web3(Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": 10}))

    def _contract(self, address: str):  # noqa: ANN202 - a web3 contract object
        from web3 import Web3

        from services.ledger.anchor import compiled_contract

        return self._w3.eth.contract(address=Web3.to_checksum_address(address), abi=compiled_contract()["abi"])

    def chain_id(self) -> int:
        return int(self._w3.eth.chain_id)

    def root_at(self, address: str, size: int) -> bytes:
        return bytes(self._contract(address).functions.root_at(size).call())

    def latest(self, address: str) -> tuple[int, bytes]:
        size, root = self._contract(address).functions.latest().call()
        return int(size), bytes(root)


class AnchorerChain:
    """The demo's chain: the ledger's in-process py-evm, read through its anchorer (only the
    contract it deployed exists there)."""

    def __init__(self, anchorer: Anchorer) -> None:
        self.anchorer = anchorer

    def chain_id(self) -> int:
        return int(self.anchorer.chain_id or 0)

    def root_at(self, address: str, size: int) -> bytes:
        if address.lower() != str(self.anchorer.contract_address).lower():
            raise ValueError(f"no contract at {address} on the demo chain")
        return self.anchorer.onchain_root(size)

    def latest(self, address: str) -> tuple[int, bytes]:
        raise ValueError("the demo chain reads roots by size only")


def cmd_verify(args: argparse.Namespace) -> int:
    from cipherfeed.client.verify import VerificationError, fetch_and_verify, normalise_receipt_id, parse_saved_receipt
    from cipherfeed.trust import TrustError, load_pinned

    config = replace(ClientConfig.from_env(), home=args.home or ClientConfig.from_env().home)
    try:
        trust = load_pinned(config.home)
    except TrustError as exc:
        print(f"cipherfeed: {exc}", file=sys.stderr)
        return 2
    try:
        receipt_id = normalise_receipt_id(args.receipt_id)
        saved = saved_receipt_path(config.home, receipt_id)
        expected = parse_saved_receipt(saved.read_bytes(), str(saved)) if saved.exists() else None
        if expected is None and not args.no_local_copy:
            raise VerificationError(
                "receipt", f"no local copy at {saved} to compare with; pass --no-local-copy to verify without it"
            )
        if not args.chain_rpc and not args.trust_ledger_anchors:
            raise VerificationError(
                "anchor",
                "no --chain-rpc to read the anchor from the chain; pass one, or "
                "--trust-ledger-anchors to accept the anchors the ledger reports",
            )
        chain = Web3Chain(args.chain_rpc) if args.chain_rpc else None
        with _client(args) as client:
            ledger = ledger_pb2_grpc.LedgerStub(client.ledger_channel())
            verified = fetch_and_verify(receipt_id, ledger, trust, chain, client.config.deadline_seconds, expected)
    except VerificationError as exc:
        print(f"cipherfeed: verification failed at {exc}", file=sys.stderr)
        return exc.exit_code
    anchored = "read on chain" if chain else "as reported by the ledger (not read on chain)"
    local = "equals the copy kept here" if expected else "NOT compared with a local copy (--no-local-copy)"
    print(f"trust     pinned {trust.fingerprint[:16]}… (log {trust.log_origin}, chain {trust.chain_id})")
    print(f"receipt   {receipt_id}: model {verified.receipt.model_version[:16]}, key {verified.receipt.key_id[:16]}")
    print(f"local     {local}")
    print(f"signature checkpoint {verified.checkpoint.origin} size {verified.checkpoint.size}: ok")
    print(f"inclusion leaf {verified.leaf_index} of {verified.checkpoint.size}: ok")
    print(f"anchor    size {verified.anchor.size} {anchored}: ok ({verified.anchor.source})")
    return 0


def cmd_trust_init(args: argparse.Namespace) -> int:
    from cipherfeed.trust import TrustError, pin, pinned_path

    home = args.home or ClientConfig.from_env().home
    try:
        trust = pin(args.file, home, force=args.force, expect_fingerprint=args.fingerprint)
    except TrustError as exc:
        print(f"cipherfeed: {exc}", file=sys.stderr)
        return 1 if "already pinned" in str(exc) else 2
    print(f"pinned {pinned_path(home)}: log {trust.log_origin}, {len(trust.checkpoint_vkeys)} checkpoint key(s), "
          f"chain {trust.chain_id} contract {trust.anchor_contract}", file=sys.stderr)  # fmt: skip
    print(f"fingerprint sha256:{trust.fingerprint}")
    return 0


def operator_trust(ledger_core: LedgerCore, client: RecommenderClient) -> TrustAnchors:
    """The trust file an operator publishes for a mesh whose ledger core it runs (the demo, the
    tests): the log's origin, the key service's checkpoint keys, the chain and the contract."""
    from cipherfeed.checkpoint import vkey
    from cipherfeed.trust import checksum_address

    anchorer = ledger_core.anchorer
    if anchorer is None:
        raise ValueError("this ledger does not anchor: there is no contract to pin")
    anchorer.anchor_pending()  # deploys the anchor contract if it is not yet
    if anchorer.chain_id is None or anchorer.contract_address is None:
        raise ValueError("the anchor contract is not deployed")
    ca_file = client.config.tls.ca_file  # the mesh CA the device was given
    origin = ledger_core.log.origin
    keys = signing_verifiers(client, origin, "ledger")
    return TrustAnchors(
        log_origin=origin,
        checkpoint_vkeys=tuple(vkey(v.name, v.public_key) for v in keys),
        chain_id=int(anchorer.chain_id),
        anchor_contract=checksum_address(anchorer.contract_address),
        mesh_ca_pem=ca_file.read_text() if ca_file is not None else None,
    )


def cmd_keys_init(args: argparse.Namespace) -> int:
    from cipherfeed.client import keystore

    with _client(args) as client:
        directory = client.config.home / "keys"
        if (directory / keystore.SECRET_FILE).exists() and not args.force:
            print(f"keys already exist in {directory}; pass --force to replace them", file=sys.stderr)
            return 1
        keys = keystore.generate(client.params())
        keystore.save(keys, directory)
        account = keystore.load_or_create_account(directory)  # kept: the same owner across key changes
        print(f"new CKKS key pair in {directory}; secret key mode 0600; owner {account.address}", file=sys.stderr)
    return 0


def cmd_ledger_deploy_contract(args: argparse.Namespace) -> int:
    from services.ledger.server import deploy_anchor_contract

    return deploy_anchor_contract()


def cmd_serve(args: argparse.Namespace) -> int:
    if args.service == "keyservice":
        from services.keyservice import server as keyservice_server

        return keyservice_server.main()
    if args.service == "ledger":
        from services.ledger import server as ledger_server

        return ledger_server.main()
    if args.service == "gateway":
        from gateway import server as gateway_server

        return gateway_server.main()
    from services.recommender import server as recommender_server

    return recommender_server.main()


@dataclass
class LocalMesh:
    redis: LocalRedis | None
    keyservice: RunningServer
    keyservice_core: KeyServiceCore
    ledger: RunningServer
    ledger_core: LedgerCore
    recommender: RunningServer
    recommender_core: RecommenderCore
    model: ModelArtifact
    client_tls: TlsConfig  # a device certificate from the mesh's development CA

    def stop(self) -> None:
        for server, core in (
            (self.recommender, self.recommender_core),
            (self.ledger, self.ledger_core),
            (self.keyservice, self.keyservice_core),
        ):
            server.stop(grace=1)
            core.close()
        if self.redis is not None:
            self.redis.stop()


def start_local_mesh(base: RecommenderConfig) -> LocalMesh:
    """Redis (if a server binary is around), the key service, the ledger (anchoring on the
    in-process py-evm chain) and the recommender, all on loopback ports."""
    from cipherfeed.config import KeyServiceConfig, LedgerConfig, RedisConfig
    from cipherfeed.devredis import LocalRedis, redis_server_binary
    from services.keyservice.server import serve as serve_keyservice
    from services.ledger.server import serve as serve_ledger
    from services.recommender.server import load_or_train
    from services.recommender.server import serve as serve_recommender

    identities = dev_identities(base.state_dir / "pki", base.tls)
    redis_server = LocalRedis.start() if redis_server_binary() else None
    cache = f"{redis_server.url}, a user and password per service, values sealed" if redis_server else None
    print(f"== cache: {cache or 'none (no redis-server found)'}", file=sys.stderr)

    def redis_config(user: str) -> RedisConfig:
        return redis_server.config_for(user, RedisConfig.from_env()) if redis_server else RedisConfig()

    ks_config = replace(
        KeyServiceConfig.from_env(),
        listen="127.0.0.1:0",
        state_dir=base.state_dir,
        redis=redis_config("keyservice"),
        tls=identities("keyservice"),
    )
    keyservice, ks_core = serve_keyservice(ks_config)
    ledger_config = replace(
        LedgerConfig.from_env(),
        listen="127.0.0.1:0",
        state_dir=base.state_dir,
        dsn=f"sqlite:///{base.state_dir / 'ledger.db'}",
        keyservice_target=f"127.0.0.1:{keyservice.port}",
        tls=identities("ledger"),
    )
    ledger, ledger_core = serve_ledger(ledger_config)
    config = replace(
        base,
        listen="127.0.0.1:0",
        keyservice_target=f"127.0.0.1:{keyservice.port}",
        ledger_target=f"127.0.0.1:{ledger.port}",
        redis=redis_config("recommender"),
        tls=identities("recommender"),
    )
    model = load_or_train(config)
    recommender, rec_core = serve_recommender(config, model)
    return LocalMesh(
        redis_server, keyservice, ks_core, ledger, ledger_core, recommender, rec_core, model, identities("device")
    )


def dev_identities(directory: Path, base: TlsConfig) -> Callable[[str], TlsConfig]:
    """The local mesh's identities: a development CA made now, its certificates issued into
    ``directory`` (keys 0600). With ``CIPHERFEED_INSECURE_DEV=1``: plaintext, no certificates."""
    if base.insecure_dev:
        return lambda _name: base
    from cipherfeed.tls import DevCertificateAuthority

    ca = DevCertificateAuthority(base.trust_domain)
    print(f"== mesh identities: a development CA for spiffe://{base.trust_domain}/*, certificates in {directory}",
          file=sys.stderr)  # fmt: skip
    return lambda name: ca.write(directory, name)


def demo_pin_trust(mesh: LocalMesh, client: RecommenderClient, state_dir: Path) -> TrustAnchors:
    """Plays the operator (writes the mesh's trust file), then the device (pins it)."""
    from cipherfeed import trust as trustfile

    published = state_dir / "mesh-trust.json"
    trustfile.write(operator_trust(mesh.ledger_core, client), published)
    pinned = trustfile.pin(published, client.config.home, force=True)  # each demo chain is new
    print(
        f"== trust: the operator's {published} pinned in {trustfile.pinned_path(client.config.home)} "
        f"(fingerprint sha256:{pinned.fingerprint[:16]}…; contract {pinned.anchor_contract})",
        file=sys.stderr,
    )
    return pinned


def cmd_demo(args: argparse.Namespace) -> int:
    """Starts the mesh in-process on loopback ports and runs one private recommendation."""
    from cipherfeed.client.verify import fetch_and_verify

    state = RecommenderConfig.from_env().state_dir
    state.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        filename=state / "demo.log",  # the services' logs; the terminal shows the device's view
    )
    print(
        f"== cipherfeed demo: local mesh with embedded defaults (service logs: {state / 'demo.log'})", file=sys.stderr
    )
    base = RecommenderConfig.from_env()
    mesh = start_local_mesh(base)
    model = mesh.model
    try:
        client_config = replace(
            ClientConfig.from_env(),
            target=f"127.0.0.1:{mesh.recommender.port}",
            keyservice_target=f"127.0.0.1:{mesh.keyservice.port}",
            ledger_target=f"127.0.0.1:{mesh.ledger.port}",
            tls=mesh.client_tls,
        )
        user = args.user or model.creator_ids[0]
        with RecommenderClient(client_config) as client:
            client.wait_ready(timeout=10)
            trust = demo_pin_trust(mesh, client, base.state_dir)
            print(f"== private For-You feed for @{user}", file=sys.stderr)
            feed, scored = recommend(client, user, args.k, args.per_creator)
            # Demo-only cross-check: the demo owns the server's model, a real client never does.
            history, _ = device_history(client, user)
            manifest = client.manifest()
            weights = history_weights(history, manifest.index_of, manifest.item_count)
            u = history_interest(model.embeddings, weights)
            clear = plaintext_scores(model.embeddings, u, model.popularity, model.popularity_weight)
            err = float(np.max(np.abs(scored.scores - clear)))
            seen = [manifest.index_of[e.item_id] for e in history]
            clear_feed = rank_feed(clear, args.k, manifest.creator_of, seen=seen, per_creator_cap=args.per_creator)
            same = clear_feed == [item.index for item in feed]
            print(
                f"== demo check against plaintext scoring of the same history (u = X^T w): max |error| "
                f"{err:.2e} over {clear.shape[0]} items; top-{args.k} identical: {same}",
                file=sys.stderr,
            )
            # Receipts: spool -> ledger -> signed checkpoint -> anchor, then verify as a client would.
            receipts, anchorer = mesh.recommender_core.receipts, mesh.ledger_core.anchorer
            assert receipts is not None and anchorer is not None  # the demo mesh has both
            receipts.flush(timeout=30)
            mesh.ledger_core.log.checkpoint()
            anchorer.anchor_pending()
            ledger = ledger_pb2_grpc.LedgerStub(client.ledger_channel())
            verified = fetch_and_verify(
                scored.receipt_id,
                ledger,
                trust,
                AnchorerChain(anchorer),
                client_config.deadline_seconds,
                scored.receipt,
            )
            origin = trust.log_origin
            print(
                f"== receipt {scored.receipt_id[:16]}… verified: leaf {verified.leaf_index} of "
                f"{verified.checkpoint.size}, checkpoint signed by the key service's '{origin}' key, "
                f"root anchored on chain ({verified.anchor.source})",
                file=sys.stderr,
            )
    finally:
        mesh.stop()
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from cipherfeed.client.feedpage import FeedPage
    from cipherfeed.client.ui import FeedPageServer

    with _client(args) as client:
        server = FeedPageServer(FeedPage(client, chain_rpc=args.chain_rpc), args.listen_host, args.port)
        print(f"feed page listening on port {server.port}: open {server.url}", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.httpd.server_close()
    return 0


def cmd_mesh(args: argparse.Namespace) -> int:
    from cipherfeed.config import default_state_dir, log_format
    from cipherfeed.mesh import MeshOptions, mesh_up

    options = MeshOptions(
        state_dir=(args.state_dir or default_state_dir()).resolve(),
        chain=args.chain,
        ephemeral_ports=args.ephemeral_ports,
        log_format=args.log_format or log_format(),
        shards=args.shards,
        gateway=not args.no_gateway,
    )
    return mesh_up(options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cipherfeed", description=__doc__)
    parser.add_argument("--target", help="recommender address (default $CIPHERFEED_TARGET or 127.0.0.1:50051)")
    parser.add_argument("--keyservice", help="key service address (default $CIPHERFEED_KEYSERVICE_TARGET)")
    parser.add_argument("--home", type=Path, help="client key directory (default $CIPHERFEED_CLIENT_HOME)")
    sub = parser.add_subparsers(dest="command", required=True)

    rec = sub.add_parser("recommend", help="a private feed for a dataset creator's engagement history")
    rec.add_argument(
        "--user", required=True, help="local user; an empty history is seeded with that dataset creator's own videos"
    )
    rec.add_argument("-k", type=int, default=10)
    rec.add_argument("--per-creator", type=int, default=2, help="at most this many videos per creator")
    rec.set_defaults(func=cmd_recommend)

    hist = sub.add_parser("history", help="the engagement history kept on this device (never sent in the clear)")
    hist_sub = hist.add_subparsers(dest="history_command", required=True)
    add = hist_sub.add_parser("add", help="record engagements with catalogue items")
    add.add_argument("--user", required=True, help="local user name")
    add.add_argument("items", nargs="+", help="item ids (or catalogue indices with --index)")
    add.add_argument("--index", action="store_true", help="the items are catalogue indices of the serving model")
    add.add_argument("--kind", choices=sorted(history_store.KIND_WEIGHT), default="watch")
    add.add_argument("--at", help="when: Unix seconds or ISO 8601 (default now)")
    for name, text in (("show", "list the stored engagements"), ("clear", "delete the user's history")):
        p = hist_sub.add_parser(name, help=text)
        p.add_argument("--user", required=True, help="local user name")
    hist.set_defaults(func=cmd_history)

    keys = sub.add_parser("keys", help="client key management")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    init = keys_sub.add_parser("init", help="generate a CKKS key pair for the server's parameters")
    init.add_argument("--force", action="store_true")
    init.set_defaults(func=cmd_keys_init)

    serve = sub.add_parser("serve", help="run a service (configured by CIPHERFEED_* variables)")
    serve.add_argument("service", choices=["recommender", "keyservice", "ledger", "gateway"])
    serve.set_defaults(func=cmd_serve)

    ledger = sub.add_parser("ledger", help="ledger operations")
    ledger_sub = ledger.add_subparsers(dest="ledger_command", required=True)
    deploy = ledger_sub.add_parser(
        "deploy-contract", help="deploy the anchor contract from the ledger's chain account (CIPHERFEED_CHAIN_*)"
    )
    deploy.set_defaults(func=cmd_ledger_deploy_contract)

    ver = sub.add_parser("verify", help="check a receipt: inclusion, checkpoint signature, on-chain anchor")
    ver.add_argument("receipt_id")
    ver.add_argument("--ledger", help="ledger address (default $CIPHERFEED_LEDGER_TARGET)")
    ver.add_argument("--chain-rpc", help="JSON-RPC URL of the chain holding the anchors")
    ver.add_argument("--trust-ledger-anchors", action="store_true", help="accept the anchors the ledger reports")
    ver.add_argument("--no-local-copy", action="store_true", help="verify without the copy this client saved")
    ver.set_defaults(func=cmd_verify)

    trust = sub.add_parser("trust", help="the operator's trust file that verify relies on")
    trust_sub = trust.add_subparsers(dest="trust_command", required=True)
    tinit = trust_sub.add_parser("init", help="pin an operator's trust file in the client home")
    tinit.add_argument("file", type=Path)
    tinit.add_argument("--force", action="store_true", help="replace an already pinned trust file")
    tinit.add_argument("--fingerprint", help="refuse unless the file has this fingerprint (sha256:<hex>)")
    tinit.set_defaults(func=cmd_trust_init)

    ui = sub.add_parser("ui", help="the device's feed page in a browser (loopback only)")
    ui.add_argument("--listen-host", default="127.0.0.1", help="a loopback address (default 127.0.0.1)")
    ui.add_argument("--port", type=int, default=8765, help="0 picks a free port (default 8765)")
    ui.add_argument("--ledger", help="ledger address (default $CIPHERFEED_LEDGER_TARGET)")
    ui.add_argument("--chain-rpc", help="JSON-RPC URL of the chain holding the anchors (receipts' checks)")
    ui.set_defaults(func=cmd_ui)

    mesh = sub.add_parser("mesh", help="the mesh as separate local processes, kept up until Ctrl-C")
    mesh_sub = mesh.add_subparsers(dest="mesh_command", required=True)
    up = mesh_sub.add_parser("up", help="start Redis, key service, ledger, recommender(s), gateway; wait; stay up")
    up.add_argument("--chain", choices=["embedded", "anvil"], default="embedded",
                    help="anchor on py-evm inside the ledger (default) or on an anvil node from .tools")  # fmt: skip
    up.add_argument("--ephemeral-ports", action="store_true", help="ports the kernel picks instead of 50051-50053")
    up.add_argument("--log-format", choices=["text", "json"], help="service logs (default $CIPHERFEED_LOG_FORMAT)")
    up.add_argument("--shards", type=int, default=1, help="recommender shards behind a coordinator")
    up.add_argument("--no-gateway", action="store_true", help="do not start the HTTP gateway")
    up.add_argument("--state-dir", type=Path, help="default $CIPHERFEED_STATE_DIR or ./var")
    up.set_defaults(func=cmd_mesh)

    demo = sub.add_parser("demo", help="local mesh + one private recommendation, end to end")
    demo.add_argument("--user", help="dataset account_id (default: the first creator)")
    demo.add_argument("-k", type=int, default=10)
    demo.add_argument("--per-creator", type=int, default=2)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except grpc.RpcError as exc:
        print(f"cipherfeed: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 3
    except (ClientError, KeyStoreError, HistoryError, ConfigError, ValueError, OSError) as exc:
        print(f"cipherfeed: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

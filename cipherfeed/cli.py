"""The ``cipherfeed`` command line: run the mesh, manage client keys, get a private feed."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np

from cipherfeed.client.interest import Engagement, interest_vector
from cipherfeed.client.keystore import KeyStoreError
from cipherfeed.client.sdk import ClientError, RecommenderClient
from cipherfeed.config import ClientConfig, ConfigError, RecommenderConfig
from cipherfeed.he.packing import plaintext_scores


def _client(args: argparse.Namespace) -> RecommenderClient:
    config = ClientConfig.from_env()
    config = replace(
        config,
        target=args.target or config.target,
        keyservice_target=args.keyservice or config.keyservice_target,
        home=args.home or config.home,
    )
    return RecommenderClient(config)


def creator_history(client: RecommenderClient, account_id: str) -> list[Engagement]:
    """A dataset creator's own listed videos as their engagement history (newest first)."""
    manifest = client.manifest()
    indices = manifest.items_of_creator(account_id)
    return [
        Engagement(item_id=manifest.item_ids[i], watched=1.0, liked=True, recency_rank=rank)
        for rank, i in enumerate(indices)
    ]


def print_feed(items: list, out: object = sys.stdout) -> None:
    print(f"{'#':>2}  {'creator':<28} {'video id':<20} url", file=out)
    for n, item in enumerate(items, 1):
        print(f"{n:>2}  {item.creator_id[:28]:<28} {item.item_id:<20} {item.url}", file=out)


def recommend(client: RecommenderClient, account_id: str, k: int, per_creator: int) -> int:
    created = client.use_keys()
    if created:
        print(
            f"generated a CKKS key pair in {client.config.home / 'keys'} (secret key stays here)",
            file=sys.stderr,
        )
    key_id = client.register()
    print(f"rotation keys registered with the key service as {key_id[:16]}…", file=sys.stderr)
    history = creator_history(client, account_id)
    t0 = time.perf_counter()
    feed, scored = client.recommend(history, k=k, per_creator_cap=per_creator)
    elapsed = 1e3 * (time.perf_counter() - t0)
    print(
        f"scored {scored.scores.shape[0]} items under encryption for @{account_id} "
        f"({len(history)} engaged videos): server {scored.server_millis:.0f} ms, "
        f"round trip {elapsed:.0f} ms, "
        f"query {scored.query_bytes / 1024:.0f} KiB, response {scored.response_bytes / 1024:.0f} KiB, "
        f"model {scored.model_version[:16]}",
        file=sys.stderr,
    )
    print_feed(feed)
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return recommend(client, args.user, args.k, args.per_creator)


def cmd_keys_init(args: argparse.Namespace) -> int:
    from cipherfeed.client import keystore

    with _client(args) as client:
        directory = client.config.home / "keys"
        if (directory / keystore.SECRET_FILE).exists() and not args.force:
            print(f"keys already exist in {directory}; pass --force to replace them", file=sys.stderr)
            return 1
        keys = keystore.generate(client.params())
        keystore.save(keys, directory)
        print(f"new CKKS key pair in {directory}; secret key mode 0600", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    if args.service == "keyservice":
        from services.keyservice import server as keyservice_server

        return keyservice_server.main()
    from services.recommender import server as recommender_server

    return recommender_server.main()


def start_local_mesh(base: RecommenderConfig) -> tuple[object, ...]:
    """Redis (if a server binary is around), the key service and the recommender on loopback."""
    from cipherfeed.config import KeyServiceConfig, RedisConfig
    from cipherfeed.devredis import LocalRedis, redis_server_binary
    from services.keyservice.server import serve as serve_keyservice
    from services.recommender.server import load_or_train
    from services.recommender.server import serve as serve_recommender

    redis_server = LocalRedis.start() if redis_server_binary() else None
    redis_config = RedisConfig(url=redis_server.url) if redis_server else RedisConfig()
    print(f"== cache: {redis_server.url if redis_server else 'none (no redis-server found)'}", file=sys.stderr)
    ks_config = replace(KeyServiceConfig.from_env(), listen="127.0.0.1:0", state_dir=base.state_dir, redis=redis_config)
    keyservice, ks_core = serve_keyservice(ks_config)
    config = replace(
        base,
        listen="127.0.0.1:0",
        keyservice_target=f"127.0.0.1:{keyservice.port}",
        redis=redis_config,
    )
    model = load_or_train(config)
    recommender, rec_core = serve_recommender(config, model)
    return redis_server, keyservice, ks_core, recommender, rec_core, model


def cmd_demo(args: argparse.Namespace) -> int:
    """Starts the mesh in-process on loopback ports and runs one private recommendation."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print("== cipherfeed demo: local mesh with embedded defaults", file=sys.stderr)
    redis_server, keyservice, ks_core, recommender, rec_core, model = start_local_mesh(RecommenderConfig.from_env())
    try:
        client_config = replace(
            ClientConfig.from_env(),
            target=f"127.0.0.1:{recommender.port}",
            keyservice_target=f"127.0.0.1:{keyservice.port}",
        )
        user = args.user or model.creator_ids[0]
        with RecommenderClient(client_config) as client:
            client.wait_ready(timeout=10)
            print(f"== private For-You feed for @{user}", file=sys.stderr)
            recommend(client, user, args.k, args.per_creator)
            # Demo-only cross-check: the demo owns the server's model, a real client never does.
            history = creator_history(client, user)
            engaged = client.items(item_ids=[e.item_id for e in history], include_embedding=True)
            u = interest_vector(np.array([list(i.embedding) for i in engaged]), history)
            scored = client.score(u)
            clear = plaintext_scores(model.embeddings, u, model.popularity, model.popularity_weight)
            err = float(np.max(np.abs(scored.scores - clear)))
            same = list(np.argsort(-scored.scores)[:10]) == list(np.argsort(-clear)[:10])
            print(
                f"== demo check against plaintext scoring: max |error| {err:.2e} over "
                f"{clear.shape[0]} items; top-10 identical: {same}",
                file=sys.stderr,
            )
    finally:
        recommender.stop(grace=1)
        rec_core.close()
        keyservice.stop(grace=1)
        ks_core.close()
        if redis_server is not None:
            redis_server.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cipherfeed", description=__doc__)
    parser.add_argument("--target", help="recommender address (default $CIPHERFEED_TARGET or 127.0.0.1:50051)")
    parser.add_argument("--keyservice", help="key service address (default $CIPHERFEED_KEYSERVICE_TARGET)")
    parser.add_argument("--home", type=Path, help="client key directory (default $CIPHERFEED_CLIENT_HOME)")
    sub = parser.add_subparsers(dest="command", required=True)

    rec = sub.add_parser("recommend", help="a private feed for a dataset creator's engagement history")
    rec.add_argument("--user", required=True, help="a dataset account_id; their own videos are the history")
    rec.add_argument("-k", type=int, default=10)
    rec.add_argument("--per-creator", type=int, default=2, help="at most this many videos per creator")
    rec.set_defaults(func=cmd_recommend)

    keys = sub.add_parser("keys", help="client key management")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    init = keys_sub.add_parser("init", help="generate a CKKS key pair for the server's parameters")
    init.add_argument("--force", action="store_true")
    init.set_defaults(func=cmd_keys_init)

    serve = sub.add_parser("serve", help="run a service (configured by CIPHERFEED_* variables)")
    serve.add_argument("service", choices=["recommender", "keyservice"])
    serve.set_defaults(func=cmd_serve)

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
    except (ClientError, KeyStoreError, ConfigError, ValueError, OSError) as exc:
        print(f"cipherfeed: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

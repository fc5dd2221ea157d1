"""Loading the TikTok profiles dataset and turning its creators' top videos into catalogue items."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

REQUIRED_COLUMNS = (
    "timestamp",
    "account_id",
    "nickname",
    "biography",
    "awg_engagement_rate",
    "comment_engagement_rate",
    "like_engagement_rate",
    "bio_link",
    "is_verified",
    "followers",
    "following",
    "likes",
    "videos_count",
    "top_videos",
)
_VIDEO_URL = re.compile(r"^https://www\.tiktok\.com/@(?P<creator>[^/]+)/video/(?P<video>\d+)$")


class DatasetError(ValueError):
    """The dataset is missing or not shaped like the TikTok profiles dataset."""


def load_profiles(path: Path) -> pd.DataFrame:
    """One row per creator; the literal string "null" is missing, counts stay integers."""
    if not path.is_file():
        raise DatasetError(
            f"dataset not found at {path}; set CIPHERFEED_DATASET to the TikTok profiles CSV "
            "(tiktok_profiles.csv) or use a synthetic catalogue"
        )
    df = pd.read_csv(
        path,
        na_values=["null"],
        keep_default_na=False,
        dtype={"account_id": str, "nickname": str, "biography": str, "id": str, "bio_link": str},
    )
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise DatasetError(f"{path} lacks columns {missing}")
    if df["account_id"].duplicated().any():
        raise DatasetError(f"{path} has duplicate account_id values")
    df["biography"] = df["biography"].fillna("")
    df["nickname"] = df["nickname"].fillna("")
    df["is_verified"] = df["is_verified"].astype(str).str.lower().eq("true")
    df["snapshot_unix"] = pd.to_datetime(df["timestamp"], utc=True).astype("int64") // 10**9
    return df.reset_index(drop=True)


TIKTOK_LAUNCH_UNIX = 1_472_688_000  # 2016-09-01; earlier "times" come from non-snowflake ids
UNKNOWN_TIME = 0


def tiktok_id_unix_seconds(video_id: str) -> int:
    """The posting time in Unix seconds (the top 32 bits of a snowflake id), or ``UNKNOWN_TIME``.

    A few ids in the dataset are not snowflakes (they would decode to 1970); those are unknown.
    """
    seconds = int(video_id) >> 32
    return seconds if seconds >= TIKTOK_LAUNCH_UNIX else UNKNOWN_TIME


def explode_videos(profiles: pd.DataFrame) -> pd.DataFrame:
    """One row per video in ``top_videos``: item_id, creator row, position in the creator's list."""
    rows: list[tuple[str, int, int, int, int]] = []
    for creator_row, (creator, urls) in enumerate(zip(profiles["account_id"], profiles["top_videos"], strict=True)):
        if not isinstance(urls, str) or not urls:
            continue
        listed = urls.split(",")
        for position, url in enumerate(listed):
            match = _VIDEO_URL.match(url.strip())
            if match is None or match["creator"] != creator:
                raise DatasetError(f"unexpected video URL {url!r} for creator {creator!r}")
            video = match["video"]
            rows.append((video, creator_row, position, len(listed), tiktok_id_unix_seconds(video)))
    items = pd.DataFrame(rows, columns=["item_id", "creator_row", "position", "listed", "posted_unix"])
    if items["item_id"].duplicated().any():
        raise DatasetError("a video id appears twice in top_videos")
    return items

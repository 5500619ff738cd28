"""Storage lifecycle (issue 16): RENDER_RETENTION_DAYS becomes the bucket's lifecycle rule, and
results never outlive the videos they point at."""

from __future__ import annotations

from celery import Celery

from worker_config.celery_config import celery_config
from worker_config.settings import Settings


def test_results_never_outlive_the_videos():
    assert celery_config(Settings(RENDER_RETENTION_DAYS=3))["result_expires"] == 3 * 86400  # not the 7-day default
    assert celery_config(Settings(RENDER_RETENTION_DAYS=30))["result_expires"] == 7 * 86400  # the shorter one
    assert celery_config(Settings())["result_expires"] == 7 * 86400  # kept for ever: RESULT_EXPIRES_S


def test_a_worker_sets_the_retention_rule_on_its_bucket(start_worker, producer: Celery, s3, bucket, redis_server):
    start_worker(RENDER_RETENTION_DAYS="3")
    result = producer.send_task("tasks.render", kwargs={"prompt": "kept three days", "seed": 1}, queue="render")
    done = result.get(timeout=120)

    rules = {r.rule_id: r for r in s3.get_bucket_lifecycle(bucket).rules}
    assert set(rules) == {"renderfarm-retention", "renderfarm-retention-inputs", "renderfarm-checkpoints"}
    rule, inputs = rules["renderfarm-retention"], rules["renderfarm-retention-inputs"]
    assert (rule.rule_id, rule.status, rule.expiration.days) == ("renderfarm-retention", "Enabled", 3)
    assert done["key"].startswith(rule.rule_filter.prefix) and rule.rule_filter.prefix == "renders/"
    # Conditioning images (inputs/<sha256>.<ext>) go with the same delay.
    assert (inputs.rule_id, inputs.rule_filter.prefix, inputs.expiration.days) == (
        "renderfarm-retention-inputs",
        "inputs/",
        3,
    )
    # Checkpoints left behind (their render failed for good) go after a day, retention or not.
    checkpoints = rules["renderfarm-checkpoints"]
    assert (checkpoints.rule_filter.prefix, checkpoints.expiration.days) == ("checkpoints/", 1)
    ttl = redis_server.client.ttl(f"celery-task-meta-{result.id}")
    assert 0 < ttl <= 3 * 86400  # the result goes no later than the video

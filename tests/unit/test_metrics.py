

def test_truncate_after_drops_redone_steps_and_a_torn_last_line(tmp_path):
    from posttrain.metrics.logger import MetricsLogger, read_metrics

    logger = MetricsLogger(tmp_path, tensorboard=False)
    for step in (0, 1, 2, 3):
        logger.log(step, {"train/reward": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "train/rew')  # a process killed mid-write
    logger.truncate_after(2)
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2]
    logger.truncate_after(-1)  # a restart without any checkpoint redoes everything
    assert read_metrics(tmp_path) == []

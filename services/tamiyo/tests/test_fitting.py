"""Growth where and when it pays: the heuristic policy tells overfitting from underfitting, grows a
slow learner whose train_loss stalled before its val_loss plateaus, stops growing a job where
growth keeps not paying, and judges a kept seed again when it stops paying. Pure, no Redis (the
decision points' determinism is in test_fitting_points.py)."""

from __future__ import annotations

from typing import Any

from tamiyo_helpers import Driver, report, seed, taken

from esper.policy.fitting import train_stall
from esper.policy.policy import Proposal

OVERFIT_VAL = [0.70, 0.60, 0.50, 0.45, 0.46, 0.48, 0.52, 0.55, 0.58, 0.60]
OVERFIT_TRAIN = [0.70, 0.58, 0.47, 0.40, 0.35, 0.31, 0.27, 0.24, 0.21, 0.18]
"""The validation loss bottoms out at epoch 3 and rises from there while the training loss keeps
falling: from epoch 6 (patience 3) it is a plateau too, the one Tamiyo used to grow on."""


def feed_losses(
    driver: Driver, val: list[float], train: list[float | None], start: int = 0
) -> list[Proposal]:
    out: list[Proposal] = []
    for offset, (v, t) in enumerate(zip(val, train, strict=True)):
        out += driver.feed(report(driver.job_id, start + offset, v, train_loss=t))
    return out


# ------------------------------------------------------------------ overfitting
def test_an_overfitting_job_is_not_grown_and_the_note_says_why() -> None:
    driver = Driver(warmup_epochs=2, patience=3, min_delta=0.01)
    notes = []
    for epoch, (v, t) in enumerate(zip(OVERFIT_VAL, OVERFIT_TRAIN, strict=True)):
        assert driver.feed(report("job-1", epoch, v, train_loss=t)) == []
        notes.append(driver.state.note)
    assert driver.state.stale_epochs >= 3  # a plateau by the val_loss rule
    assert notes[6] == (
        "overfitting: val loss 0.52 rising for 3 epochs (from 0.45) while train loss falls "
        "(0.4 → 0.27); no capacity added to an overfitting model until the val loss is back "
        "to 0.45"
    )
    assert notes[9].startswith("overfitting: val loss 0.6 rising for 6 epochs (from 0.45)")
    # Back down to where the rise began: no longer overfitting, and the plateau stands.
    [germinate] = driver.feed(report("job-1", 10, 0.44, train_loss=0.17))
    assert germinate.action == "germinate" and driver.state.overfit is None
    assert germinate.evidence["growth_trigger"] == "plateau"


def test_the_same_val_loss_without_a_train_loss_is_a_plateau() -> None:
    """The control: what tells overfitting is the train_loss falling away from the val_loss."""
    driver = Driver(warmup_epochs=2, patience=3, min_delta=0.01)
    proposals = feed_losses(driver, OVERFIT_VAL, [None] * len(OVERFIT_VAL))
    assert [p.action for p in proposals] == ["germinate"]
    assert proposals[0].evidence["epoch"] == 6


def test_a_noisy_plateau_is_not_overfitting() -> None:
    """The val_loss goes up as often as down on a plateau and the train_loss creeps down: the
    gap does not widen by overfit_gap, so the plateau is one, and Tamiyo grows."""
    driver = Driver(warmup_epochs=2, patience=3, min_delta=0.01)
    val = [0.70, 0.60, 0.50, 0.45, 0.455, 0.448, 0.456]
    train = [0.70, 0.58, 0.47, 0.44, 0.435, 0.43, 0.425]
    [germinate] = feed_losses(driver, val, list(train))
    assert germinate.evidence["epoch"] == 6 and driver.state.overfit is None


# ---------------------------------------------------------------- slow learner
SLOW_VAL = [1.5 - 0.004 * e for e in range(40)]
"""Creeping down by less than min_delta (0.005) an epoch, yet by more than it every two: the
plateau count never reaches patience (3)."""
SLOW_TRAIN = [1.4 - 0.005 * e for e in range(40)]
"""0.36 % an epoch: 1.8 % over train_stall_epochs (5), under train_stall_delta (3 %)."""


def test_a_slow_learner_whose_train_loss_stalled_grows_before_any_plateau() -> None:
    driver = Driver(warmup_epochs=2)  # the documented defaults otherwise
    proposals = feed_losses(driver, SLOW_VAL[:6], list(SLOW_TRAIN[:6]))
    [germinate] = proposals
    evidence = germinate.evidence
    assert germinate.action == "germinate" and evidence["epoch"] == 5
    assert evidence["growth_trigger"] == "train_stall"
    assert isinstance(evidence["stale_epochs"], int) and evidence["stale_epochs"] < 3
    assert evidence["train_loss_from"] == 1.4 and evidence["train_stall_epochs"] == 5
    assert "underfitting: train_loss stalled (1.4 → 1.375, 1.8% over 5 epochs" in germinate.reason
    assert driver.state.model_epoch == 5  # the next stall is measured from the new model


def test_the_slow_learner_without_a_train_loss_never_grows() -> None:
    """The control, and the issue's job: 40 epochs, a val_loss creeping down, no growth."""
    driver = Driver(warmup_epochs=2)
    assert feed_losses(driver, SLOW_VAL, [None] * len(SLOW_VAL)) == []
    assert driver.state.note.startswith("no plateau") and "train_loss not measured" in (
        driver.state.note
    )


def test_a_train_loss_still_falling_fast_is_no_stall() -> None:
    driver = Driver(warmup_epochs=2)
    train = [1.4 - 0.03 * e for e in range(12)]  # 2-3 % an epoch
    assert feed_losses(driver, SLOW_VAL[:12], list(train)) == []
    assert "train_loss improving" in driver.state.note


def test_an_overfitting_job_whose_train_loss_stalled_is_not_grown() -> None:
    """A stalled train_loss calls for growth only in a job that does not overfit."""
    driver = Driver(warmup_epochs=2, patience=50, overfit_patience=2)
    val = [1.0, 0.9, 0.95, 1.05, 1.15, 1.25, 1.35]
    train = [0.9, 0.9, 0.899, 0.898, 0.897, 0.896, 0.895]
    assert feed_losses(driver, val, list(train)) == []
    assert train_stall(driver.state, driver.config) is not None
    assert driver.state.note.startswith("overfitting: val loss 1.35 rising for 5 epochs")


# ---------------------------------------------------------- growth that pays
def grow_and_judge(driver: Driver, start: int, contribution: float) -> int:
    """Flat reports until Tamiyo germinates; the job applies it, the seed measures
    `contribution` until its verdict and leaves if retired. The next epoch."""
    epoch = start
    while True:
        proposals = driver.feed(report("job-1", epoch, 0.69))
        epoch += 1
        if proposals:
            break
        assert epoch < start + 20, driver.state.note
    [germinate] = proposals
    assert germinate.action == "germinate"
    where = germinate.layer
    driver.event(taken("job-1", driver.state.decisions[-1], "applied", layer_name=where, slot=0))
    listed = [seed(where, 0, contribution=contribution)]
    while True:
        verdicts = driver.feed(report("job-1", epoch, 0.69, seeds=listed))
        epoch += 1
        if verdicts:
            break
        assert epoch < start + 40, driver.state.note
    if verdicts[0].action == "retire":
        driver.feed(report("job-1", epoch, 0.69))  # its slot is DORMANT again
        epoch += 1
    return epoch


PAYING: dict[str, Any] = {
    "warmup_epochs": 2,
    "patience": 2,
    "min_delta": 0.01,
    "evaluation_epochs": 1,
    "cooldown_epochs": 0,
}


def test_growth_stops_after_max_unpaid_germinations_and_says_so() -> None:
    driver = Driver(**PAYING, max_unpaid_germinations=2)
    epoch = grow_and_judge(driver, 0, contribution=0.0)
    epoch = grow_and_judge(driver, epoch, contribution=-0.01)
    assert driver.state.unpaid_germinations == 2
    assert driver.epochs(epoch, epoch + 10) == []
    assert driver.state.note.startswith("growth stopped: the last 2 germinations did not pay")
    assert driver.state.germinations == 2


def test_with_one_more_allowed_it_grows_a_third_time() -> None:
    """The control of the test above."""
    driver = Driver(**PAYING, max_unpaid_germinations=3)
    epoch = grow_and_judge(driver, 0, contribution=0.0)
    epoch = grow_and_judge(driver, epoch, contribution=-0.01)
    [germinate] = driver.epochs(epoch, epoch + 3)
    assert germinate.action == "germinate"


def test_a_germination_that_pays_ends_the_run_of_unpaid_ones() -> None:
    driver = Driver(**PAYING, max_unpaid_germinations=2)
    epoch = grow_and_judge(driver, 0, contribution=0.0)
    assert driver.state.unpaid_germinations == 1
    grow_and_judge(driver, epoch, contribution=0.2)
    assert driver.state.unpaid_germinations == 0


# --------------------------------------------------------------- judged again
def kept(driver: Driver) -> int:
    """Germinate, apply, keep at a contribution of 0.2; the next epoch."""
    epoch = grow_and_judge(driver, 0, contribution=0.2)
    track = driver.state.track("2", 0)
    assert track is not None and track.verdict == "keep"
    return epoch


def test_a_kept_seed_that_stops_paying_is_retired_with_the_evidence() -> None:
    driver = Driver(**PAYING, max_seeds_per_job=1, rejudge_threshold=0.005, rejudge_epochs=3)
    epoch = kept(driver)
    low = [seed("2", 0, contribution=0.001)]
    assert driver.feed(report("job-1", epoch, seeds=low)) == []
    # An unmeasured epoch neither counts nor breaks the run.
    assert driver.feed(report("job-1", epoch + 1, seeds=[seed("2", 0)])) == []
    assert driver.feed(report("job-1", epoch + 2, seeds=low)) == []
    [retire] = driver.feed(report("job-1", epoch + 3, seeds=[seed("2", 0, contribution=-0.01)]))
    assert (retire.action, retire.layer, retire.seed) == ("retire", "2", 0)
    assert retire.ramp_steps == driver.config.retire_ramp_steps
    evidence = retire.evidence
    assert evidence["contribution"] == -0.01 and evidence["rejudge_threshold"] == 0.005
    assert evidence["low_epochs"] == 3 and evidence["rejudge_epochs"] == 3
    assert evidence["kept_epoch"] == epoch - 1
    assert "no longer pays" in retire.reason
    record = driver.state.blueprints["residual_mlp"]
    assert (record.kept, record.retired) == (1, 1)
    assert driver.state.unpaid_germinations == 0  # it paid once: a germination is judged once


def test_a_kept_seed_that_pays_again_in_time_is_not_retired() -> None:
    driver = Driver(**PAYING, max_seeds_per_job=1, rejudge_threshold=0.005, rejudge_epochs=3)
    epoch = kept(driver)
    contributions = [0.0, 0.0, 0.02, 0.0, 0.0, 0.05, 0.0]  # never three low in a row
    for offset, c in enumerate(contributions):
        listed = [seed("2", 0, contribution=c)]
        assert driver.feed(report("job-1", epoch + offset, seeds=listed)) == []
    track = driver.state.track("2", 0)
    assert track is not None and track.verdict == "keep" and track.low_epochs == 1

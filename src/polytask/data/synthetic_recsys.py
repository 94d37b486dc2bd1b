"""A synthetic recommender log with six behaviour tasks: the native setting of MMoE, PLE,
HoME and DTRN (categorical user/item fields, behaviour sequences, dense features).

Generative model (all draws from one seeded generator):

1. Items i = 1..I: a category c_i with centroid m_c ~ N(0, I_K); latent v_i = m_c + 0.5 ε;
   an author (each author writes in one category), a popularity p_i and a duration d_i ~ N(0, 1).
2. Users u: an age bucket, a city, an activity level a_u ~ N(0, 1) and a latent
   x_u = 0.5 m_age + ε (age buckets share tastes).
3. Behaviour sequences: for each behaviour b in (click, like, share), items drawn with
   P(i | u) ∝ exp(β_b x_u·v_i / √K + 0.5 p_i) (β = 1, 2, 3: likes and shares follow taste more
   closely), lengths growing with a_u (shares can be empty), right-padded with id 0.
4. Impressions: a user drawn ∝ exp(0.5 a_u), an item drawn ∝ exp(0.5 x_u·v_i / √K + 0.5 p_i)
   (a mildly personalised feed), a context value h ~ N(0, 1).
5. Task t's interest is a task-specific mix of the behaviour interests
   s_{u,b} = mean of v_i over the user's b-sequence:  s_{u,t} = Σ_b M_{t,b} s_{u,b}.
   Its score is  z_t = α · w_t·(s_{u,t} ⊙ v_i) + γ · c_t·φ  with φ eight standardised main
   effects (age/city/category/author biases, popularity, duration, activity, context), and
   per task weights mixing a shared and an own unit direction:
       w_t = √ρ w_0 + √(1-ρ) w'_t,   c_t = √ρ c_0 + √(1-ρ) c'_t   (orthonormal directions),
   so any two tasks' weights have cosine ρ = ``correlation``.
6. y_t ~ Bernoulli(σ(z_t + b_t)), with b_t found by bisection so the mean positive rate is the
   task's target rate: click 0.30, long_view 0.20, like 0.05, follow 0.015, share 0.02, and
   conversion 0.05 *of clicked impressions*. Conversion is labelled only where click = 1
   (mask False elsewhere: the partial-label case). ``sparsity`` s moves every rate r to
   0.3^(1-s) r^s in log space (s = 0: every task as dense as click; s = 1: the rates above).

Inputs: ``fields`` [N, 6] (user, age, city, item, category, author), ``seqs`` [N, 3, L] item
ids (0 = padding), ``dense`` [N, 4] (popularity, duration and activity with noise, context).
Split 70/15/15 at random with ``seed``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from polytask.errors import PolytaskError
from polytask.registry import SUITES
from polytask.tasks import InputSpec, MultiTaskData, Task, TaskSuite, split_data

TASKS = ("click", "long_view", "like", "follow", "share", "conversion")
RATES = {"click": 0.30, "long_view": 0.20, "like": 0.05, "follow": 0.015, "share": 0.02, "conversion": 0.05}
BEHAVIOURS = ("click", "like", "share")
SHARPNESS = (1.0, 2.0, 3.0)
# M[t, b]: how much task t's interest draws on each behaviour sequence (rows sum to 1).
MIX = {"click": (0.6, 0.3, 0.1), "long_view": (0.5, 0.4, 0.1), "like": (0.2, 0.6, 0.2),
       "follow": (0.2, 0.5, 0.3), "share": (0.1, 0.3, 0.6), "conversion": (0.5, 0.3, 0.2)}
NUM_AGES, NUM_CITIES, NUM_CATEGORIES, NUM_AUTHORS = 8, 100, 50, 500


def calibrate_bias(z: Tensor, rate: float, iters: int = 50) -> float:
    """The offset b with mean(σ(z + b)) = rate (bisection; the mean is increasing in b)."""
    lo, hi = -30.0, 30.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if float(torch.sigmoid(z + mid).mean()) < rate:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _standardise(x: Tensor) -> Tensor:
    return (x - x.mean(0)) / x.std(0).clamp(min=1e-8)


def _mixed_directions(n: int, dim: int, rho: float, g: torch.Generator) -> Tensor:
    """n unit vectors in R^dim with pairwise cosine rho: √ρ shared + √(1-ρ) own, all orthonormal."""
    q, _ = torch.linalg.qr(torch.randn(dim, n + 1, generator=g))
    return math.sqrt(rho) * q[:, :1].T + math.sqrt(1 - rho) * q[:, 1:].T  # [n, dim]


def _sequences(logits: Tensor, lengths: Tensor, seq_len: int, g: torch.Generator) -> Tensor:
    """Draw ``seq_len`` item indices per row from softmax(logits); keep the first ``lengths`` (ids 1..I), pad 0."""
    items = torch.multinomial(torch.softmax(logits, 1), seq_len, replacement=True, generator=g) + 1
    keep = torch.arange(seq_len)[None, :] < lengths[:, None]
    return torch.where(keep, items, torch.zeros_like(items))


@SUITES.register("synthetic-recsys")
def synthetic_recsys(*, seed: int = 0, num_samples: int = 20000, num_tasks: int = 6, correlation: float = 0.5,
                     sparsity: float = 1.0, num_users: int = 2000, num_items: int = 5000, latent_dim: int = 16,
                     seq_len: int = 20, interaction_scale: float = 1.5, main_scale: float = 1.0) -> TaskSuite:
    """Synthetic recommender log: user/item fields, click/like/share sequences, six behaviour tasks (dense to rare)."""
    if not 0.0 <= correlation <= 1.0:
        raise PolytaskError(f"correlation must lie in [0, 1], got {correlation}")
    if not 1 <= num_tasks <= len(TASKS):
        raise PolytaskError(f"num_tasks must be between 1 and {len(TASKS)}, got {num_tasks}")
    if sparsity < 0:
        raise PolytaskError(f"sparsity must be non-negative (0 = all tasks dense, 1 = default rates), got {sparsity}")
    if num_samples < 20 or num_users < 1 or num_items < 1 or seq_len < 4 or latent_dim < 1:
        raise PolytaskError("synthetic-recsys needs num_samples >= 20, seq_len >= 4 and positive num_users, num_items, latent_dim")
    g = torch.Generator().manual_seed(seed)
    k = latent_dim
    # 1. items
    centroids = torch.randn(NUM_CATEGORIES, k, generator=g)
    category = torch.randint(0, NUM_CATEGORIES, (num_items,), generator=g)
    v = centroids[category] + 0.5 * torch.randn(num_items, k, generator=g)
    per_cat = NUM_AUTHORS // NUM_CATEGORIES
    author = category * per_cat + torch.randint(0, per_cat, (num_items,), generator=g)
    popularity = torch.randn(num_items, generator=g)
    duration = torch.randn(num_items, generator=g)
    # 2. users
    age_taste = torch.randn(NUM_AGES, k, generator=g)
    age = torch.randint(0, NUM_AGES, (num_users,), generator=g)
    city = torch.randint(0, NUM_CITIES, (num_users,), generator=g)
    activity = torch.randn(num_users, generator=g)
    x = 0.5 * age_taste[age] + torch.randn(num_users, k, generator=g)
    affinity = x @ v.T / math.sqrt(k)  # [U, I]
    # 3. behaviour sequences
    frac = torch.sigmoid(activity)  # more active users have longer histories
    lo_hi = ((4, seq_len), (1, seq_len // 2), (0, seq_len // 4))
    seqs, interests = [], []
    for beta, (lo, hi) in zip(SHARPNESS, lo_hi):
        lengths = (lo + frac * (hi - lo) + torch.rand(num_users, generator=g)).floor().long().clamp(lo, hi)
        s = _sequences(beta * affinity + 0.5 * popularity, lengths, seq_len, g)
        seqs.append(s)
        vpad = torch.cat([torch.zeros(1, k), v])  # row 0 = padding
        interests.append(vpad[s].sum(1) / lengths.clamp(min=1)[:, None].float())
    seqs_t = torch.stack(seqs, 1)  # [U, S, L]
    interest = torch.stack(interests, 1)  # [U, S, K]
    # 4. impressions
    user = torch.multinomial(torch.softmax(0.5 * activity, 0), num_samples, replacement=True, generator=g)
    counts = torch.bincount(user, minlength=num_users)
    feed = torch.multinomial(torch.softmax(0.5 * affinity + 0.5 * popularity, 1), int(counts.max()),
                             replacement=True, generator=g)  # [U, max impressions per user]
    order = torch.argsort(user, stable=True)
    rank = torch.empty_like(user)
    rank[order] = torch.arange(num_samples) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    item = feed[user, rank]
    context = torch.randn(num_samples, generator=g)
    # 5. scores
    names = TASKS[:num_tasks]
    w = _mixed_directions(len(TASKS), k, correlation, g)
    biases = [torch.randn(n, generator=g) for n in (NUM_AGES, NUM_CITIES, NUM_CATEGORIES, NUM_AUTHORS)]
    main = _standardise(torch.stack([biases[0][age[user]], biases[1][city[user]], biases[2][category[item]],
                                     biases[3][author[item]], popularity[item], duration[item],
                                     activity[user], context], 1))
    c = _mixed_directions(len(TASKS), main.shape[1], correlation, g)
    mix = torch.tensor([MIX[t] for t in TASKS])  # [T, S]
    task_interest = torch.einsum("ts,usk->utk", mix, interest)[user]  # [N, T, K]
    inter = torch.einsum("ntk,nk,tk->nt", task_interest, v[item], w)
    z = interaction_scale * _standardise(inter) + main_scale * main @ c.T  # [N, T]
    # 6. labels
    y: dict[str, Tensor] = {}
    masks: dict[str, Tensor] = {}
    for j, name in enumerate(names):
        rate = min(0.3 ** (1 - sparsity) * RATES[name] ** sparsity, 0.5)
        if name == "conversion":
            clicked = y["click"].bool()
            b = calibrate_bias(z[clicked, j], rate) if clicked.any() else 0.0
            masks[name] = clicked
        else:
            b = calibrate_bias(z[:, j], rate)
        y[name] = torch.bernoulli(torch.sigmoid(z[:, j] + b), generator=g)
        if name == "conversion":
            y[name] = y[name] * masks[name]
    noisy = lambda t: t + 0.3 * torch.randn(num_samples, generator=g)  # noqa: E731
    inputs = {
        "fields": torch.stack([user, age[user], city[user], item + 1, category[item], author[item]], 1),
        "seqs": seqs_t[user],
        "dense": torch.stack([noisy(popularity[item]), noisy(duration[item]), noisy(activity[user]), context], 1),
    }
    data = MultiTaskData(inputs, y, masks)
    train, val, test = split_data(data, 0.15, 0.15, seed)
    spec = InputSpec("recsys", field_vocab=(num_users, NUM_AGES, NUM_CITIES, num_items + 1, NUM_CATEGORIES, NUM_AUTHORS),
                     seq_names=BEHAVIOURS, item_vocab=num_items + 1, seq_len=seq_len, dense_dim=4)
    rates = ", ".join(f"{n} {float(y[n][masks[n]].mean() if n in masks else y[n].mean()):.3f}" for n in names)
    return TaskSuite("synthetic-recsys", [Task(n, "binary", metrics=("auroc", "ap")) for n in names], spec,
                     train, val, test,
                     description=(f"synthetic recommender log: {num_samples} impressions of {num_items} items to "
                                  f"{num_users} users, 6 fields, {len(BEHAVIOURS)} behaviour sequences of length "
                                  f"{seq_len}, 4 dense features; binary tasks with positive rates {rates} "
                                  f"(conversion: of clicks, labelled on clicks only); task correlation {correlation}"))

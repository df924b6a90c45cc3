"""Paired pointing-game gain of stride 16 over stride 32, 3 seeds, boxes resampled jointly (run from the repo root)."""
import json, numpy as np
runs = {'s32': ['plain-s32', 'plain-s32-seed1', 'plain-s32-seed2'], 's16': ['plain-s16', 'plain-s16-seed1', 'plain-s16-seed2']}
ev = {k: [json.load(open(f'docs/results/stride/{n}.eval.json')) for n in v] for k, v in runs.items()}
hits = {k: np.array([e['pointing_game']['hits'] for e in v], float) for k, v in ev.items()}
for k in runs:
    print(k, 'AUC', [round(e['mean_auc'], 3) for e in ev[k]], 'PG', [round(e['pointing_game']['overall']['hit_rate'], 3) for e in ev[k]],
          'flat', [e['pointing_game']['overall']['flat'] for e in ev[k]])
d = hits['s16'].mean(0) - hits['s32'].mean(0)
rng = np.random.default_rng(0); n = d.size
boot = [d[rng.integers(0, n, n)].mean() for _ in range(2000)]
lo, hi = np.percentile(boot, [2.5, 97.5])
out = {'pg_s32_mean': float(hits['s32'].mean()), 'pg_s16_mean': float(hits['s16'].mean()),
       'pg_gain_points': float(100 * d.mean()), 'pg_gain_ci_points': [float(100 * lo), float(100 * hi)],
       'boxes': int(n), 'seeds': 3, 'resampling': 'boxes, paired across arms and seeds (2000 resamples)'}
print(json.dumps(out, indent=1))
json.dump(out, open('docs/results/stride/pg_gain_3seeds.json', 'w'), indent=1)

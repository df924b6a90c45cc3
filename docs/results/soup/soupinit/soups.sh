set -e
PY=.venv/bin/python; R=runs/soupinit
[[ -f $R/soupinit-uniform/soup.json ]] || $PY -m models.soup runs/soup/plain-s0 $R/init0-s1 $R/init0-s2 --out $R/soupinit-uniform > $R/soupinit-uniform.log 2>&1
for s in 1 2; do [[ -f $R/bn-init0-s$s/soup.json ]] || $PY -m models.soup $R/init0-s$s --out $R/bn-init0-s$s > $R/bn-init0-s$s.log 2>&1; done
for n in soupinit-uniform bn-init0-s1 bn-init0-s2; do echo "$n $(grep 'mean AUC' $R/$n.log)"; done
$PY -m models.evaluate compare --a runs/soup/bn-s0 $R/bn-init0-s1 $R/bn-init0-s2 --b $R/soupinit-uniform $R/soupinit-uniform $R/soupinit-uniform --out $R/gain_soupinit_vs_bn.json | tail -3
$PY -m models.evaluate compare --a runs/soup/plain-s0 $R/init0-s1 $R/init0-s2 --b $R/soupinit-uniform $R/soupinit-uniform $R/soupinit-uniform --out $R/gain_soupinit_vs_plain.json | tail -2
$PY -m models.evaluate teacher --reference runs/soup/plain-s0 --runs runs/soup/plain-s0 $R/init0-s1 $R/init0-s2 --out $R/ensemble_init0_eval.json | tail -2

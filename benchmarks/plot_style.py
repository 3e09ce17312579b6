"""One label and one colour per strategy, shared by every benchmark plot and table."""

LABELS = {
    "uniform": "Uniform",
    "linupper": "LinUpper",
    "quadratic": "Quadratic",
    "extremes": "Extremes",
    "capped": "Capped (Prop. 1)",
    "irdro": "IR-DRO",
}
COLORS = {
    "uniform": "black",
    "linupper": "tab:blue",
    "quadratic": "tab:green",
    "extremes": "tab:orange",
    "capped": "tab:purple",
    "irdro": "tab:red",
}

"""Analysis layer: TIS statistics (ranking, the statistics files, the analysis), the frequency baseline, concept
recovery, bias detection and seed replicates."""

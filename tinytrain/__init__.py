"""Training the tiny model (data generation, the shapes recipe, fine-tuning steps for RL refits): a repo-local
package like tests/ and bench/, not part of the installed servicer, which needs only tinyvlm's random-weight build."""

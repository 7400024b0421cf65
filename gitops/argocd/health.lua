-- Argo CD health check for kubetune.io/FineTuneJob.
-- Conditions are the truth (status.phase is only their summary): Failed or Stalled -> Degraded,
-- Succeeded -> Healthy, Suspended (spec.suspend, or waiting for Kueue admission) -> Suspended,
-- anything else -> Progressing. A status older than the spec (observedGeneration behind
-- metadata.generation) is Progressing until the operator has looked at the new spec.
local hs = {}

local function find_condition(conditions, wanted)
  if conditions == nil then
    return nil
  end
  for _, condition in ipairs(conditions) do
    if condition.type == wanted then
      return condition
    end
  end
  return nil
end

local function is_true(condition)
  return condition ~= nil and condition.status == "True"
end

local function describe(condition, fallback)
  if condition ~= nil and condition.message ~= nil and condition.message ~= "" then
    return condition.message
  end
  if condition ~= nil and condition.reason ~= nil and condition.reason ~= "" then
    return condition.reason
  end
  return fallback
end

local function progress_message(status)
  local progress = status.progress
  if progress == nil or progress.step == nil then
    return "Training"
  end
  local text = "Training: step " .. tostring(progress.step)
  if progress.totalSteps ~= nil then
    text = text .. "/" .. tostring(progress.totalSteps)
  end
  if status.metrics ~= nil and status.metrics.trainLoss ~= nil then
    text = text .. ", loss " .. string.format("%.4g", status.metrics.trainLoss)
  end
  return text
end

local status = obj.status
if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator to observe the FineTuneJob"
  return hs
end

local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator to observe generation " .. tostring(generation)
  return hs
end

local conditions = status.conditions
local failed = find_condition(conditions, "Failed")
local stalled = find_condition(conditions, "Stalled")
local succeeded = find_condition(conditions, "Succeeded")
local suspended = find_condition(conditions, "Suspended")
local running = find_condition(conditions, "Running")

if is_true(failed) then
  hs.status = "Degraded"
  hs.message = describe(failed, "Failed")
  return hs
end
if is_true(succeeded) then
  hs.status = "Healthy"
  local result = status.adapter or status.model
  if result ~= nil and result.uri ~= nil then
    hs.message = "Fine-tuned: " .. result.uri
  else
    hs.message = describe(succeeded, "Succeeded")
  end
  return hs
end
if is_true(stalled) then
  hs.status = "Degraded"
  hs.message = describe(stalled, "Stalled")
  return hs
end
if is_true(suspended) then
  hs.status = "Suspended"
  hs.message = describe(suspended, "Suspended")
  return hs
end
if is_true(running) then
  hs.status = "Progressing"
  hs.message = progress_message(status)
  return hs
end

-- No decisive condition (an operator that has only written the phase so far): fall back on the phase.
local phase = status.phase
if phase == "Succeeded" then
  hs.status = "Healthy"
elseif phase == "Failed" then
  hs.status = "Degraded"
elseif phase == "Suspended" then
  hs.status = "Suspended"
else
  hs.status = "Progressing"
end
hs.message = status.message or phase or "Pending"
return hs
